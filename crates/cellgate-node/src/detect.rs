//! Secrets and personal data leaving in requests: the detectors a capability's `detect` turns
//! on, over the URL, the headers, and the body the node read. What is found is named by its
//! detector, never quoted: not in the audit record, not in the answer, not in the log.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use cellgate_api::model::Detect;
use regex::Regex;

/// What a detector finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Credentials and keys.
    Secret,
    /// Personal data.
    Pii,
}

/// Where something was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The path (never redacted: it is what was decided on).
    Path,
    /// The query string.
    Query,
    /// A header, by name.
    Header(String),
    /// The body read.
    Body,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Path => f.write_str("the path"),
            Place::Query => f.write_str("the query"),
            Place::Header(h) => write!(f, "header {h}"),
            Place::Body => f.write_str("the body"),
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The detector's name (`aws_access_key`, `email`, a pattern's own name, ...).
    pub detector: String,
    /// Its class.
    pub class: Class,
    /// Where.
    pub place: Place,
}

struct Detector {
    name: &'static str,
    class: Class,
    re: Regex,
    /// A further check of a match (a card number's Luhn digit, a token's entropy).
    check: Option<fn(&str) -> bool>,
}

static DETECTORS: LazyLock<Vec<Detector>> = LazyLock::new(|| {
    let d = |name, class, re: &str, check| Detector {
        name,
        class,
        re: Regex::new(re).expect("detector regex"),
        check,
    };
    vec![
        d(
            "aws_access_key",
            Class::Secret,
            r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
            None,
        ),
        d(
            "github_token",
            Class::Secret,
            r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})\b",
            None,
        ),
        d(
            "private_key",
            Class::Secret,
            r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----",
            None,
        ),
        d(
            "jwt",
            Class::Secret,
            r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
            None,
        ),
        d(
            "email",
            Class::Pii,
            r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
            None,
        ),
        d(
            "payment_card",
            Class::Pii,
            r"\b\d(?:[ -]?\d){12,18}\b",
            Some(luhn),
        ),
        d("us_ssn", Class::Pii, r"\b\d{3}-\d{2}-\d{4}\b", None),
    ]
});

static HIGH_ENTROPY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9+/_=-]{24,}").expect("entropy regex"));

/// Whether `name` is one of the built-in detectors (not counting `high_entropy`).
pub fn is_builtin(name: &str) -> bool {
    DETECTORS.iter().any(|d| d.name == name)
}

/// The name of the high-entropy detector.
pub const HIGH_ENTROPY_NAME: &str = "high_entropy";

fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    (13..=19).contains(&digits.len()) && sum.is_multiple_of(10)
}

/// Shannon entropy in bits per character, for tokens with both letters and digits.
fn high_entropy(s: &str) -> bool {
    if !(s.chars().any(|c| c.is_ascii_digit()) && s.chars().any(|c| c.is_ascii_alphabetic())) {
        return false;
    }
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[usize::from(b)] += 1;
    }
    let n = s.len() as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    bits >= 4.2
}

/// Compiled detectors of one's own, by regex (checked to compile when the cell was loaded).
static COMPILED: LazyLock<Mutex<HashMap<String, Arc<Regex>>>> = LazyLock::new(Default::default);

fn compiled(re: &str) -> Option<Arc<Regex>> {
    let mut cache = COMPILED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(r) = cache.get(re) {
        return Some(r.clone());
    }
    let r = Arc::new(
        regex::RegexBuilder::new(re)
            .size_limit(1 << 20)
            .build()
            .ok()?,
    );
    if cache.len() >= 4096 {
        cache.clear();
    }
    cache.insert(re.to_string(), r.clone());
    Some(r)
}

/// A set of detectors: the built-in ones of some classes, high entropy or not, and patterns of
/// one's own.
#[derive(Debug, Clone, Default)]
pub struct Detectors {
    classes: Vec<Class>,
    entropy: bool,
    custom: Vec<(String, Class, Arc<Regex>)>,
}

impl Detectors {
    /// The detectors `d` turns on whose class `wanted` accepts.
    pub fn of(d: &Detect, wanted: impl Fn(Class) -> bool) -> Self {
        Self::union([d], wanted)
    }

    /// The detectors any of `ds` turns on whose class `wanted` accepts.
    pub fn union<'a>(
        ds: impl IntoIterator<Item = &'a Detect>,
        wanted: impl Fn(Class) -> bool,
    ) -> Self {
        let mut out = Self::default();
        for d in ds {
            for (class, on) in [
                (Class::Secret, d.secrets.is_some()),
                (Class::Pii, d.pii.is_some()),
            ] {
                if on && wanted(class) && !out.classes.contains(&class) {
                    out.classes.push(class);
                }
            }
            out.entropy |= d.entropy && d.secrets.is_some() && wanted(Class::Secret);
            for p in &d.patterns {
                let class = if p.secret { Class::Secret } else { Class::Pii };
                if wanted(class) && !out.custom.iter().any(|(n, _, _)| *n == p.name) {
                    if let Some(re) = compiled(&p.regex) {
                        out.custom.push((p.name.clone(), class, re));
                    }
                }
            }
        }
        out
    }

    /// Whether nothing is looked for.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty() && self.custom.is_empty()
    }

    /// What `text` holds: each detector that matches, once.
    pub fn scan(&self, text: &str) -> Vec<(String, Class)> {
        let mut out = Vec::new();
        for d in DETECTORS.iter().filter(|d| self.classes.contains(&d.class)) {
            if d.re
                .find_iter(text)
                .any(|m| d.check.is_none_or(|c| c(m.as_str())))
            {
                out.push((d.name.to_string(), d.class));
            }
        }
        if self.entropy
            && HIGH_ENTROPY
                .find_iter(text)
                .any(|m| high_entropy(m.as_str()))
        {
            out.push((HIGH_ENTROPY_NAME.to_string(), Class::Secret));
        }
        for (name, class, re) in &self.custom {
            if re.is_match(text) {
                out.push((name.clone(), *class));
            }
        }
        out
    }

    /// `text` with what the detectors find replaced by `[REDACTED:<detector>]`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        let mark = |name: &str| format!("[REDACTED:{name}]");
        for d in DETECTORS.iter().filter(|d| self.classes.contains(&d.class)) {
            out =
                d.re.replace_all(&out, |c: &regex::Captures<'_>| {
                    let m = c.get(0).map_or("", |m| m.as_str());
                    if d.check.is_none_or(|f| f(m)) {
                        mark(d.name)
                    } else {
                        m.to_string()
                    }
                })
                .into_owned();
        }
        for (name, _, re) in &self.custom {
            out = re.replace_all(&out, mark(name).as_str()).into_owned();
        }
        if self.entropy {
            out = HIGH_ENTROPY
                .replace_all(&out, |c: &regex::Captures<'_>| {
                    let m = c.get(0).map_or("", |m| m.as_str());
                    if high_entropy(m) && !m.starts_with("[REDACTED") {
                        mark(HIGH_ENTROPY_NAME)
                    } else {
                        m.to_string()
                    }
                })
                .into_owned();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use cellgate_api::manifest::DetectAction;
    use cellgate_api::model::DetectPattern;

    fn detect(entropy: bool, patterns: Vec<DetectPattern>) -> Detect {
        Detect {
            secrets: Some(DetectAction::Deny),
            pii: Some(DetectAction::Redact),
            entropy,
            patterns,
        }
    }

    fn all(entropy: bool) -> Detectors {
        Detectors::of(&detect(entropy, vec![]), |_| true)
    }

    fn names(text: &str, entropy: bool) -> Vec<String> {
        all(entropy)
            .scan(text)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn each_detector_finds_its_kind_and_only_it() {
        assert_eq!(names("key=AKIAIOSFODNN7EXAMPLE", false), ["aws_access_key"]);
        assert_eq!(
            names("token ghp_0123456789abcdefghijABCDEFGHIJ012345", false),
            ["github_token"]
        );
        assert_eq!(
            names("-----BEGIN OPENSSH PRIVATE KEY-----\nabc", false),
            ["private_key"]
        );
        assert_eq!(
            names(
                "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlMTIz",
                false
            ),
            ["jwt"]
        );
        assert_eq!(names("mail ana.lopez@example.org now", false), ["email"]);
        assert_eq!(names("card 4111 1111 1111 1111", false), ["payment_card"]);
        assert_eq!(names("ssn 078-05-1120", false), ["us_ssn"]);
        // Near misses.
        assert!(names("AKIA123", false).is_empty());
        assert!(names("card 4111 1111 1111 1112", false).is_empty(), "Luhn");
        assert!(names("order 1234567890123", false).is_empty(), "Luhn");
        assert!(names("version 1.2.3 of the-library", false).is_empty());
        // Only the classes asked for.
        let only = |c: Class| Detectors::of(&detect(false, vec![]), move |x| x == c);
        assert!(only(Class::Secret).scan("ana@example.org").is_empty());
        assert!(only(Class::Pii).scan("AKIAIOSFODNN7EXAMPLE").is_empty());
    }

    #[test]
    fn high_entropy_tokens_only_when_asked() {
        let token = "q8Zr2LmX7vPw4NcK9sTb1YhD6jFa3GeU";
        assert!(names(token, false).is_empty());
        assert_eq!(names(token, true), [HIGH_ENTROPY_NAME]);
        assert!(names("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1", true).is_empty());
        assert!(names("/repos/my-organisation/my-repository-name", true).is_empty());
    }

    #[test]
    fn patterns_of_ones_own_are_detectors_too() {
        let d = detect(
            false,
            vec![DetectPattern {
                name: "employee_id".into(),
                regex: r"\bEMP-[0-9]{6}\b".into(),
                secret: false,
            }],
        );
        let ds = Detectors::of(&d, |_| true);
        assert_eq!(
            ds.scan("ticket for EMP-004211"),
            vec![("employee_id".to_string(), Class::Pii)]
        );
        assert_eq!(
            ds.redact("EMP-004211 and EMP-1"),
            "[REDACTED:employee_id] and EMP-1"
        );
        // Not when its class is not wanted.
        assert!(Detectors::of(&d, |c| c == Class::Secret)
            .scan("EMP-004211")
            .is_empty());
    }

    #[test]
    fn redaction_names_the_detector_and_keeps_the_rest() {
        let text = r#"{"to":"ana.lopez@example.org","key":"AKIAIOSFODNN7EXAMPLE","n":3}"#;
        let r = all(false).redact(text);
        assert_eq!(
            r,
            r#"{"to":"[REDACTED:email]","key":"[REDACTED:aws_access_key]","n":3}"#
        );
        let pii = Detectors::of(&detect(false, vec![]), |c| c == Class::Pii);
        assert!(pii.redact(text).contains("AKIA"));
        assert_eq!(all(true).redact("nothing here"), "nothing here");
    }
}
