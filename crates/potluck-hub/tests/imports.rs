//! The hub's rooms import one way (ARCHITECTURE.md, "The hub's rooms"). This test reads
//! every source file of the hub and fails on an import the rule forbids: a `crate::`
//! path into a room the file's room may not use, or a `super::` path that climbs out of
//! its room (`super::super`, or `super::` in a room's root file).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What each room may import besides itself. `None`: anything (the roof and `state`).
fn allowed(room: &str) -> Option<&'static [&'static str]> {
    const BASE: &[&str] = &["config", "http", "state"];
    Some(match room {
        "config" => &[],
        "http" => &["config", "state"],
        "routing" => BASE,
        "books" => BASE,
        // Metrics read the registry and the usage queue when scraped; the rooms above
        // count into them.
        "metrics" => &["config", "http", "state", "routing", "books"],
        // Alerts watch the registry, the usage queue and the metrics' counters.
        "alerts" => &["config", "http", "state", "routing", "books", "metrics"],
        "trust" => &["config", "http", "state", "routing", "books", "metrics"],
        "api" | "accounts" => &[
            "config", "http", "state", "routing", "books", "metrics", "trust",
        ],
        // The web pages call the account and trust rooms' own functions.
        "web" => &[
            "config", "http", "state", "routing", "books", "metrics", "trust", "accounts",
        ],
        // The roof puts the rooms together; `state` holds each room's state type.
        "lib" | "hub" | "router" | "testing" | "state" => return None,
        other => panic!("unknown room `{other}`: add it to the import rule"),
    })
}

/// The room of a file: its first component under `src/` (`api/relay/whole.rs` → `api`,
/// `hub.rs` → `hub`).
fn room_of(rel: &Path) -> String {
    let first = rel.components().next().expect("a path").as_os_str();
    Path::new(first)
        .file_stem()
        .expect("a name")
        .to_string_lossy()
        .into_owned()
}

/// Whether the file is its room's root module (`api/mod.rs`, `hub.rs`).
fn is_room_root(rel: &Path) -> bool {
    rel.components().count() == 1 || rel.ends_with("mod.rs") && rel.components().count() == 2
}

/// The code of a file without comments and without its `#[cfg(test)]` module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The rooms a piece of code names through `crate::`, including grouped imports
/// (`use crate::{a::b, c};`).
fn crate_rooms(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (depth == 1 && c == ',') {
                    push_ident(&mut out, &item);
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else if depth == 1 {
                    item.push(c);
                }
            }
        } else {
            push_ident(&mut out, after);
        }
        rest = after;
    }
    out
}

fn push_ident(out: &mut BTreeSet<String>, s: &str) {
    let ident: String = s
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    // `crate::Hub` and friends name the roof's re-exports.
    if !ident.is_empty() && ident.chars().next().is_some_and(char::is_lowercase) {
        out.insert(ident);
    }
}

/// Every violation of the rule in one file.
fn violations(rel: &Path, text: &str) -> Vec<String> {
    let code = code_of(text);
    let room = room_of(rel);
    let mut bad = Vec::new();
    if code.contains("super::super") {
        bad.push(format!(
            "{}: `super::super` climbs out of its room",
            rel.display()
        ));
    }
    if is_room_root(rel) && code.contains("super::") {
        bad.push(format!(
            "{}: `super::` in a room's root names the crate root",
            rel.display()
        ));
    }
    if let Some(ok) = allowed(&room) {
        for target in crate_rooms(&code) {
            if target != room && !ok.contains(&target.as_str()) {
                bad.push(format!(
                    "{}: `{room}` imports `crate::{target}` (allowed: {ok:?})",
                    rel.display()
                ));
            }
        }
    }
    bad
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn the_hub_imports_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "found {} files", files.len());
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        bad.extend(violations(f.strip_prefix(&src).expect("under src"), &text));
    }
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
}

#[test]
fn the_checker_catches_what_the_rule_forbids() {
    let check = |path: &str, text: &str| violations(Path::new(path), text);
    // Downward and sideways-into-the-base imports pass.
    assert!(check("api/dispatch.rs", "use crate::routing::registry::Lease;").is_empty());
    assert!(check(
        "trust/guard.rs",
        "use crate::{books::usage, routing::send};"
    )
    .is_empty());
    assert!(check("routing/send.rs", "use crate::state::HubState;").is_empty());
    // Upward ones fail, however they are written.
    assert_eq!(check("routing/send.rs", "use crate::api::now_ms;").len(), 1);
    assert_eq!(
        check("routing/send.rs", "let x = crate::trust::guard::check();").len(),
        1
    );
    assert_eq!(
        check("books/usage.rs", "use crate::{config, routing::link};").len(),
        1
    );
    assert_eq!(
        check("trust/admin.rs", "use crate::accounts::action_log;").len(),
        1
    );
    assert_eq!(check("api/mod.rs", "use crate::accounts::keys;").len(), 1);
    assert_eq!(
        check("accounts/keys.rs", "use crate::api::ctx::Ctx;").len(),
        1
    );
    assert_eq!(
        check("http/auth.rs", "use crate::routing::link::Need;").len(),
        1
    );
    assert!(check("api/ctx.rs", "crate::metrics::Done {").is_empty());
    assert_eq!(
        check("routing/send.rs", "use crate::metrics::Metrics;").len(),
        1
    );
    assert_eq!(
        check("metrics/scrape.rs", "use crate::trust::guard;").len(),
        1
    );
    // Climbing with `super::` fails too.
    assert_eq!(
        check("routing/link.rs", "use super::super::api::Ctx;").len(),
        1
    );
    assert_eq!(check("routing/mod.rs", "use super::api;").len(), 1);
    assert!(check("routing/link.rs", "use super::registry::Lease;").is_empty());
    // Comments and a file's own tests are not imports.
    assert!(check(
        "routing/send.rs",
        "// see crate::api\n#[cfg(test)]\nmod tests { use crate::api; }"
    )
    .is_empty());
}
