//! LLM usage read from responses as they flow to the agent, unbuffered: OpenAI-compatible chat
//! completions and responses (JSON, and SSE with a usage chunk or `response.completed`) and
//! Anthropic Messages (JSON, and SSE `message_start` / `message_delta`). And the price table
//! that turns tokens into spend.
//!
//! The parser sees a copy of each body frame; the frame itself goes on to the agent at once.
//! SSE is parsed line by line (only the current line is held); a JSON body is held up to
//! [`MAX_JSON_BYTES`] for parsing at its end. What cannot be read is reported as such
//! ([`Reading::Unreadable`]): the budget then treats it as using everything, never as free.

use std::collections::BTreeMap;
use std::path::Path;

use cellgate_api::manifest::parse_micros;
use serde::Deserialize;

/// Largest JSON response body read for usage, bytes.
pub const MAX_JSON_BYTES: usize = 8 * 1024 * 1024;
/// Longest SSE line held, bytes (a longer line is skipped; usage lines are short).
pub const MAX_SSE_LINE: usize = 1024 * 1024;
/// Largest price table file, bytes.
const MAX_PRICE_TABLE_BYTES: u64 = 1024 * 1024;

/// Tokens a response reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// The model the provider names.
    pub model: Option<String>,
    /// Input (prompt) tokens, cache reads and writes included.
    pub input: u64,
    /// Output (completion) tokens.
    pub output: u64,
}

impl Usage {
    /// Input plus output.
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// What a finished response said about its usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// Usage was reported.
    Reported(Usage),
    /// A body that reports no usage (not a completion: a model list, an error).
    None,
    /// A body that should report usage and could not be read (a stream without a usage chunk,
    /// a compressed or oversized body, a body cut short).
    Unreadable(&'static str),
}

#[derive(Debug)]
enum Kind {
    Json(Vec<u8>),
    Sse { line: Vec<u8>, skipping: bool },
    Other,
    Overflow,
}

/// Reads usage from one response body, frame by frame.
#[derive(Debug)]
pub struct UsageReader {
    kind: Kind,
    usage: Option<Usage>,
    /// Content-Encoding other than identity: nothing can be read.
    encoded: bool,
}

impl UsageReader {
    /// A reader for a response with this `Content-Type` and `Content-Encoding`.
    pub fn new(content_type: Option<&str>, content_encoding: Option<&str>) -> Self {
        let ct = content_type
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let kind = if ct == "text/event-stream" {
            Kind::Sse {
                line: Vec::new(),
                skipping: false,
            }
        } else if ct == "application/json" || ct.ends_with("+json") {
            Kind::Json(Vec::new())
        } else {
            Kind::Other
        };
        let encoded = content_encoding
            .map(str::trim)
            .is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"));
        Self {
            kind,
            usage: None,
            encoded,
        }
    }

    /// Feeds a frame of the body.
    pub fn feed(&mut self, data: &[u8]) {
        if self.encoded {
            return;
        }
        match &mut self.kind {
            Kind::Json(buf) => {
                if buf.len().saturating_add(data.len()) > MAX_JSON_BYTES {
                    self.kind = Kind::Overflow;
                } else {
                    buf.extend_from_slice(data);
                }
            }
            Kind::Sse { line, skipping } => {
                let mut lines = Vec::new();
                for &b in data {
                    if b == b'\n' {
                        if !*skipping {
                            lines.push(std::mem::take(line));
                        }
                        line.clear();
                        *skipping = false;
                    } else if !*skipping {
                        if line.len() >= MAX_SSE_LINE {
                            line.clear();
                            *skipping = true;
                        } else {
                            line.push(b);
                        }
                    }
                }
                for l in lines {
                    self.sse_line(&l);
                }
            }
            Kind::Other | Kind::Overflow => {}
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        // Most events carry content, not usage: parse only those with a `"usage": {` in them.
        if data == b"[DONE]" || !has_usage_object(data) {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
            self.merge(&v);
        }
    }

    /// Takes the usage of one JSON document (a whole body or one SSE event), keeping the
    /// highest count of each kind (Anthropic's `message_delta` repeats the running total).
    fn merge(&mut self, v: &serde_json::Value) {
        let Some(found) = usage_of(v) else {
            return;
        };
        let u = self.usage.get_or_insert_with(Usage::default);
        u.input = u.input.max(found.input);
        u.output = u.output.max(found.output);
        if u.model.is_none() {
            u.model = found.model;
        }
    }

    /// The reading once the body has ended (`complete`: it ended normally, not cut).
    pub fn finish(mut self, complete: bool) -> Reading {
        if self.encoded {
            return Reading::Unreadable("compressed response");
        }
        match std::mem::replace(&mut self.kind, Kind::Other) {
            Kind::Json(buf) => {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&buf) {
                    self.merge(&v);
                }
                match self.usage {
                    Some(u) => Reading::Reported(u),
                    None if !complete => Reading::Unreadable("response cut short"),
                    None => Reading::None,
                }
            }
            Kind::Sse { line, .. } => {
                if !line.is_empty() {
                    self.sse_line(&line);
                }
                match self.usage {
                    Some(u) => Reading::Reported(u),
                    None => Reading::Unreadable("event stream without usage"),
                }
            }
            Kind::Overflow => Reading::Unreadable("JSON response over the size read for usage"),
            Kind::Other => Reading::None,
        }
    }
}

/// Whether `data` has a `"usage"` key whose value is an object (`"usage" : {`), by a byte scan.
fn has_usage_object(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    let mut rest = data;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = rest.get(at + KEY.len()..).unwrap_or_default();
        let mut after = rest.iter().skip_while(|b| b.is_ascii_whitespace());
        if after.next() == Some(&b':') && after.find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            return true;
        }
    }
    false
}

fn count(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

/// The usage in one JSON document: `usage` at the top (chat completions, responses, Anthropic
/// messages and `message_delta`), under `response` (responses API events) or under `message`
/// (Anthropic `message_start`).
fn usage_of(v: &serde_json::Value) -> Option<Usage> {
    let (holder, usage) = [Some(v), v.get("response"), v.get("message")]
        .into_iter()
        .flatten()
        .find_map(|h| Some((h, h.get("usage").filter(|u| u.is_object())?)))?;
    let input = count(usage, "prompt_tokens")
        .max(count(usage, "input_tokens"))
        .saturating_add(count(usage, "cache_creation_input_tokens"))
        .saturating_add(count(usage, "cache_read_input_tokens"));
    let output = count(usage, "completion_tokens").max(count(usage, "output_tokens"));
    Some(Usage {
        model: holder
            .get("model")
            .or_else(|| v.get("model"))
            .and_then(|m| m.as_str())
            .map(str::to_string),
        input,
        output,
    })
}

/// Prices per million tokens, in millionths of a US dollar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    /// Per million input tokens.
    pub input: u64,
    /// Per million output tokens.
    pub output: u64,
}

/// The price table: model name (or prefix ending in `*`) to prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    models: BTreeMap<String, Price>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    currency: Option<String>,
    models: BTreeMap<String, PriceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    input: String,
    output: String,
}

/// The default prices (USD per million tokens), overridden by `--price-table`.
pub const DEFAULT_PRICES: &str = include_str!("prices.yaml");

impl PriceTable {
    /// Parses a table (YAML: `currency: USD`, `models: {NAME: {input: "2.50", output: "10.00"}}`).
    ///
    /// # Errors
    /// A message naming the entry at fault.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: PriceFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(c) = f.currency.as_deref().filter(|c| *c != "USD") {
            return Err(format!("currency {c:?}: prices are in USD"));
        }
        if f.models.is_empty() {
            return Err("no models".into());
        }
        let mut models = BTreeMap::new();
        for (name, e) in f.models {
            let p = |s: &str, what: &str| {
                parse_micros(s).ok_or_else(|| {
                    format!("models.{name}.{what}: {s:?} is not an amount like \"2.50\"")
                })
            };
            models.insert(
                name.clone(),
                Price {
                    input: p(&e.input, "input")?,
                    output: p(&e.output, "output")?,
                },
            );
        }
        Ok(Self { models })
    }

    /// The shipped table.
    pub fn default_table() -> Self {
        // The shipped file is checked by a test; an error here cannot happen at run time.
        Self::parse(DEFAULT_PRICES).unwrap_or(Self {
            models: BTreeMap::new(),
        })
    }

    /// Reads a table from a file.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Self, String> {
        let len = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if len > MAX_PRICE_TABLE_BYTES {
            return Err(format!(
                "{}: over {MAX_PRICE_TABLE_BYTES} bytes",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The price of `model`: an exact entry, else the longest `prefix*` entry, else the
    /// dearest entry of the table (a model without a price is never cheaper than any priced
    /// one).
    pub fn price(&self, model: Option<&str>) -> Price {
        let model = model.unwrap_or_default();
        if let Some(p) = self.models.get(model) {
            return *p;
        }
        let prefixed = self
            .models
            .iter()
            .filter_map(|(k, p)| Some((k.strip_suffix('*')?, p)))
            .filter(|(k, _)| model.starts_with(k))
            .max_by_key(|(k, _)| k.len());
        if let Some((_, p)) = prefixed {
            return *p;
        }
        Price {
            input: self
                .models
                .values()
                .map(|p| p.input)
                .max()
                .unwrap_or(u64::MAX),
            output: self
                .models
                .values()
                .map(|p| p.output)
                .max()
                .unwrap_or(u64::MAX),
        }
    }

    /// The cost of `usage`, in millionths of a dollar, rounded up.
    pub fn cost_micros(&self, usage: &Usage) -> u64 {
        let p = self.price(usage.model.as_deref());
        let part = |tokens: u64, per_million: u64| {
            let v = u128::from(tokens) * u128::from(per_million);
            u64::try_from(v.div_ceil(1_000_000)).unwrap_or(u64::MAX)
        };
        part(usage.input, p.input).saturating_add(part(usage.output, p.output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(ct: &str, frames: &[&str]) -> Reading {
        let mut r = UsageReader::new(Some(ct), None);
        for f in frames {
            r.feed(f.as_bytes());
        }
        r.finish(true)
    }

    fn reported(model: &str, input: u64, output: u64) -> Reading {
        Reading::Reported(Usage {
            model: Some(model.into()),
            input,
            output,
        })
    }

    // Shapes as the providers document and send them.
    const OPENAI_CHAT: &str = r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion","created":1741569952,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I assist you today?","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default"}"#;
    const OPENAI_RESPONSES: &str = r#"{"id":"resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b","object":"response","created_at":1741476542,"status":"completed","model":"gpt-4.1-2025-04-14","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"In a peaceful grove...","annotations":[]}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}"#;
    const ANTHROPIC: &str = r#"{"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[{"type":"text","text":"Hi! My name is Claude."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":2095,"output_tokens":503,"cache_creation_input_tokens":10,"cache_read_input_tokens":5}}"#;

    #[test]
    fn json_bodies_of_each_provider() {
        assert_eq!(
            read("application/json", &[OPENAI_CHAT]),
            reported("gpt-4o-2024-08-06", 19, 10)
        );
        // Split at any point, it reads the same.
        let (a, b) = OPENAI_RESPONSES.split_at(77);
        assert_eq!(
            read("application/json; charset=utf-8", &[a, b]),
            reported("gpt-4.1-2025-04-14", 36, 87)
        );
        assert_eq!(
            read("application/json", &[ANTHROPIC]),
            reported("claude-sonnet-4-20250514", 2110, 503)
        );
        // No usage: a model list, an error.
        assert_eq!(
            read("application/json", &[r#"{"object":"list","data":[]}"#]),
            Reading::None
        );
        assert_eq!(read("text/plain", &["hello"]), Reading::None);
    }

    #[test]
    fn openai_chat_stream_with_a_usage_chunk() {
        let frames = [
            "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\ndata: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":",
            "12,\"completion_tokens\":3,\"total_tokens\":15}}\n\n",
            "data: [DONE]\n\n",
        ];
        assert_eq!(
            read("text/event-stream", &frames),
            reported("gpt-4o-mini", 12, 3)
        );
    }

    #[test]
    fn openai_responses_stream() {
        let frames = [
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"model\":\"gpt-4.1\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n",
            "event: response.completed\r\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"model\":\"gpt-4.1\",\"usage\":{\"input_tokens\":37,\"output_tokens\":11,\"total_tokens\":48}}}\r\n\r\n",
        ];
        assert_eq!(
            read("text/event-stream", &frames),
            reported("gpt-4.1", 37, 11)
        );
    }

    #[test]
    fn anthropic_stream() {
        let frames = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-3-5-haiku-20241022\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ];
        assert_eq!(
            read("text/event-stream", &frames),
            reported("claude-3-5-haiku-20241022", 25, 15)
        );
    }

    #[test]
    fn what_cannot_be_read_is_never_free() {
        // A stream that reports nothing (OpenAI without stream_options.include_usage).
        let r = read(
            "text/event-stream",
            &["data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n"],
        );
        assert!(matches!(r, Reading::Unreadable(_)), "{r:?}");
        let mut gz = UsageReader::new(Some("application/json"), Some("gzip"));
        gz.feed(OPENAI_CHAT.as_bytes());
        assert!(matches!(gz.finish(true), Reading::Unreadable(_)));
        let mut cut = UsageReader::new(Some("application/json"), None);
        cut.feed(&OPENAI_CHAT.as_bytes()[..100]);
        assert!(matches!(cut.finish(false), Reading::Unreadable(_)));
        let mut big = UsageReader::new(Some("application/json"), None);
        big.feed(&vec![b' '; MAX_JSON_BYTES + 1]);
        assert!(matches!(big.finish(true), Reading::Unreadable(_)));
        // An overlong SSE line is skipped, the usage after it still read.
        let mut long = UsageReader::new(Some("text/event-stream"), None);
        long.feed(&vec![b'x'; MAX_SSE_LINE + 10]);
        long.feed(
            b"\ndata: {\"model\":\"m\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n",
        );
        assert_eq!(long.finish(true), reported("m", 1, 2));
    }

    #[test]
    fn usage_objects_are_found_by_their_bytes() {
        assert!(has_usage_object(br#"{"usage":{"a":1}}"#));
        assert!(has_usage_object(br#"{"x":1, "usage" :  { }}"#));
        assert!(has_usage_object(
            br#"{"usage":null,"message":{"usage":{"input_tokens":1}}}"#
        ));
        assert!(!has_usage_object(br#"{"usage":null}"#));
        assert!(!has_usage_object(br#"{"text":"usage"}"#));
        assert!(!has_usage_object(br#"{"usage""#));
    }

    #[test]
    fn prices() {
        let t = PriceTable::parse(
            "currency: USD\nmodels:\n  gpt-4o: {input: \"2.50\", output: \"10.00\"}\n  \"claude-sonnet-4*\": {input: \"3\", output: \"15\"}\n",
        )
        .unwrap();
        let u = |m: &str, i, o| Usage {
            model: Some(m.into()),
            input: i,
            output: o,
        };
        // 1M input at 2.50 + 100k output at 10.00 = 3.50.
        assert_eq!(t.cost_micros(&u("gpt-4o", 1_000_000, 100_000)), 3_500_000);
        assert_eq!(
            t.cost_micros(&u("claude-sonnet-4-20250514", 1000, 1000)),
            18_000
        );
        // Rounded up: one token is never free.
        assert_eq!(t.cost_micros(&u("gpt-4o", 1, 0)), 3);
        // An unknown model is priced as the dearest.
        assert_eq!(
            t.price(Some("mystery")),
            Price {
                input: 3_000_000,
                output: 15_000_000
            }
        );
        assert!(
            PriceTable::parse("currency: EUR\nmodels: {a: {input: \"1\", output: \"1\"}}").is_err()
        );
        assert!(
            PriceTable::parse("models: {a: {input: \"x\", output: \"1\"}}")
                .unwrap_err()
                .contains("models.a.input")
        );
        assert!(PriceTable::parse("models: {}").is_err());
        // The shipped table parses.
        assert!(PriceTable::parse(DEFAULT_PRICES).is_ok());
    }
}
