//! The CLI's lists read every page the hub answers, and a hub whose pages do not end
//! cannot keep the CLI asking.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// More accounts than one page of the CLI's (500) and of the hub's default (100):
/// `potluck accounts list` shows every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_longer_than_a_page_is_listed_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (_hub, url) = start_hub(&data, tmp.path(), "warn");
    let key_file = data.join("admin.key");
    let admin = std::fs::read_to_string(&key_file).unwrap();
    let http = reqwest::Client::new();
    for i in 0..520 {
        let r = http
            .post(format!("{url}/admin/v1/accounts"))
            .bearer_auth(admin.trim())
            .json(&serde_json::json!({"name": format!("member{i:03}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "account {i}");
    }
    let (ok, list, err) = cli(&["accounts", "list"], &key_file, &url);
    assert!(ok, "{err}");
    for i in [0, 99, 100, 499, 500, 519] {
        assert!(
            list.contains(&format!("member{i:03} ")),
            "member{i:03}: {list}"
        );
    }
    let members = list.lines().filter(|l| l.contains("member")).count();
    assert_eq!(members, 520, "each account once");
    let (ok, banned, err) = cli(&["accounts", "list", "--status", "banned"], &key_file, &url);
    assert!(ok, "{err}");
    assert!(!banned.contains("member"), "{banned}");
    let (ok, _, err) = cli(&["accounts", "list", "--status", "maybe"], &key_file, &url);
    assert!(!ok && err.contains("'status' must be"), "{err}");
}

/// A hostile hub that answers each page with `page(after)`; counts the pages asked for.
async fn hostile_hub(
    page: fn(Option<i64>) -> String,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let head = String::from_utf8_lossy(&got).into_owned();
            let after = head
                .split_once("after=")
                .and_then(|(_, rest)| rest.split([' ', '&']).next()?.parse().ok());
            let body = page(after);
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    (url, asked)
}

fn keys_list(url: String) -> (bool, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("admin.key");
    std::fs::write(&key_file, "pa-not-a-real-key\n").unwrap();
    cli(&["keys", "list"], &key_file, &url)
}

/// Hostile hubs answer "more follow" for ever: with a cursor that does not move, or with
/// empty pages whose cursor does. The CLI stops with an error after a page or two instead
/// of asking for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_whose_pages_never_end_is_an_error() {
    fn still(_: Option<i64>) -> String {
        let row = r#"{"id":5,"name":"k","account":"a","prefix":"pk-x","created_at":1}"#;
        let rows = vec![row; 500].join(",");
        format!(r#"{{"data":[{rows}],"has_more":true,"last_id":5}}"#)
    }
    fn creeping(after: Option<i64>) -> String {
        let next = after.unwrap_or(0) + 1;
        format!(r#"{{"data":[],"has_more":true,"last_id":{next}}}"#)
    }
    for (page, says) in [
        (
            still as fn(Option<i64>) -> String,
            "says more rows follow but not where",
        ),
        (creeping, "says more rows follow a page it did not fill"),
    ] {
        let (url, asked) = hostile_hub(page).await;
        let run = tokio::task::spawn_blocking(move || keys_list(url));
        let (ok, _, err) = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the CLI stops")
            .unwrap();
        assert!(!ok, "an endless list is an error");
        assert!(err.contains(says), "{err}");
        let asked = asked.load(std::sync::atomic::Ordering::SeqCst);
        assert!(asked <= 2, "the CLI asked {asked} times");
    }
}
