#![allow(clippy::unwrap_used)]
use super::*;

fn over(hub: Option<&str>, backends: &[&str]) -> Overrides {
    Overrides {
        hubs: hub.map(str::to_owned).into_iter().collect(),
        // These tests are about the merge rules; the clear-text rule has its own.
        insecure: true,
        backends: backends.iter().map(|s| s.to_string()).collect(),
        ..Overrides::default()
    }
}

/// A network eavesdropper must not get the provider token: plain `http` is accepted
/// only to this machine, unless the volunteer says `--insecure` or `insecure = true`.
#[test]
fn plain_http_to_another_machine_needs_insecure() {
    let file = || -> FileConfig {
        toml::from_str("token = \"pt-x\"\n[[backends]]\nurl = \"http://127.0.0.1:9/v1\"\n").unwrap()
    };
    let strict = |hub: &str| Overrides {
        insecure: false,
        ..over(Some(hub), &[])
    };
    for hub in [
        "http://hub.example.org",
        "http://192.0.2.7:8080",
        "http://[2001:db8::1]",
    ] {
        let e = resolve(&strict(hub), file(), paths()).unwrap_err();
        assert_eq!(e.field, "hub", "{hub}");
        assert!(e.to_string().contains("--insecure"), "{e}");
        // The flag, or the file's setting, accepts it.
        assert!(resolve(&over(Some(hub), &[]), file(), paths()).is_ok());
        let mut f = file();
        f.insecure = Some(true);
        assert!(resolve(&strict(hub), f, paths()).is_ok(), "{hub}");
    }
    for hub in [
        "https://hub.example.org",
        "http://127.0.0.1:8080",
        "http://127.3.4.5",
        "http://localhost:8080",
        "http://[::1]:8080",
    ] {
        assert!(resolve(&strict(hub), file(), paths()).is_ok(), "{hub}");
    }
}

fn paths() -> Paths {
    Paths {
        state_dir: PathBuf::from("/state"),
        control_socket: PathBuf::from("/state/provide.sock"),
    }
}

#[test]
fn overrides_win_over_file() {
    let file: FileConfig = toml::from_str(
        "hub = \"http://file:1\"\ntoken = \"pt-file\"\nmax_concurrency = 3\n[[backends]]\nurl = \"http://127.0.0.1:9/v1\"\napi_key = \"k\"\n",
    )
    .unwrap();
    let c = resolve(&over(Some("http://flag:2"), &[]), file, paths()).unwrap();
    assert_eq!(c.hubs.len(), 1);
    assert_eq!(c.hubs[0].as_str(), "http://flag:2/");
    assert_eq!(c.token, "pt-file");
    assert_eq!(c.max_concurrency, 3);
    assert_eq!(c.backends[0].api_key.as_deref(), Some("k"));
    assert_eq!(c.state_dir.as_deref(), Some(Path::new("/state")));
}

/// Several hubs: the file's `hub` then `hubs` (duplicates dropped), or the flags'
/// instead; each is checked for clear text; more than [`MAX_HUBS`] is refused.
#[test]
fn several_hubs_from_file_or_flags() {
    let file = |extra: &str| -> FileConfig {
        toml::from_str(&format!(
            "token = \"pt-x\"\n{extra}\n[[backends]]\nurl = \"http://127.0.0.1:9/v1\"\n"
        ))
        .unwrap()
    };
    let strict = Overrides {
        insecure: false,
        ..over(None, &[])
    };
    let c = resolve(
        &strict,
        file("hub = \"https://a.example\"\nhubs = [\"https://b.example\", \"https://a.example\"]"),
        paths(),
    )
    .unwrap();
    let urls: Vec<&str> = c.hubs.iter().map(HubUrl::as_str).collect();
    assert_eq!(urls, ["https://a.example/", "https://b.example/"]);
    let c = resolve(&strict, file("hubs = [\"https://b.example\"]"), paths()).unwrap();
    assert_eq!(c.hubs.len(), 1);
    // Flags replace the file's hubs.
    let mut o = strict.clone();
    o.hubs = vec!["https://c.example".into(), "https://d.example".into()];
    let c = resolve(&o, file("hubs = [\"https://b.example\"]"), paths()).unwrap();
    let urls: Vec<&str> = c.hubs.iter().map(HubUrl::as_str).collect();
    assert_eq!(urls, ["https://c.example/", "https://d.example/"]);
    // One clear-text hub among several is refused.
    let e = resolve(
        &strict,
        file("hubs = [\"https://b.example\", \"http://c.example\"]"),
        paths(),
    )
    .err()
    .unwrap();
    assert_eq!(e.field, "hub");
    let many: Vec<String> = (0..=MAX_HUBS)
        .map(|i| format!("\"https://h{i}.example\""))
        .collect();
    let e = resolve(
        &strict,
        file(&format!("hubs = [{}]", many.join(","))),
        paths(),
    )
    .err()
    .unwrap();
    assert_eq!(e.field, "hubs");
    let e = resolve(&strict, file("hubs = []"), paths()).err().unwrap();
    assert_eq!(e.field, "hub");
}

#[test]
fn errors_name_the_field() {
    let e = resolve(
        &over(None, &["http://x/v1"]),
        FileConfig::default(),
        paths(),
    )
    .unwrap_err();
    assert_eq!(e.field, "hub");
    let file: FileConfig = toml::from_str("token = \"t\"").unwrap();
    let e = resolve(&over(Some("http://h"), &["ftp://x"]), file, paths()).unwrap_err();
    assert_eq!(e.field, "backend");
    let e = toml::from_str::<FileConfig>("max_concurrency = \"lots\"")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("max_concurrency"), "{e}");
    let file: FileConfig = toml::from_str("token = \"t\"\nmax_concurrency = 0").unwrap();
    assert_eq!(
        resolve(&over(Some("http://h"), &["http://x"]), file, paths())
            .unwrap_err()
            .field,
        "max_concurrency"
    );
    let file: FileConfig = toml::from_str("token = \"t\"\nreconnect_max_secs = -1").unwrap();
    assert_eq!(
        resolve(&over(Some("http://h"), &["http://x"]), file, paths())
            .unwrap_err()
            .field,
        "reconnect_max_secs"
    );
}

/// Timings whose tiny values made a loop spin: `discovery_interval_secs = 1e-9` asked
/// every backend for its models back to back, and `reconnect_max_secs` under the
/// first reconnect delay reconnected to a hub that was down without pause. Each is
/// refused, naming the field; the floors themselves, and the example's 30 s, are fine.
#[test]
fn timings_refuse_values_that_spin() {
    let resolved = |extra: &str| {
        let file: FileConfig = toml::from_str(&format!("token = \"t\"\n{extra}")).unwrap();
        resolve(&over(Some("http://h"), &["http://x"]), file, paths())
    };
    let mut wrong = Vec::new();
    for (extra, field) in [
        ("discovery_interval_secs = 0", "discovery_interval_secs"),
        ("discovery_interval_secs = 1e-9", "discovery_interval_secs"),
        ("discovery_interval_secs = 0.5", "discovery_interval_secs"),
        ("discovery_interval_secs = nan", "discovery_interval_secs"),
        ("reconnect_max_secs = 0", "reconnect_max_secs"),
        ("reconnect_max_secs = 1e-9", "reconnect_max_secs"),
        ("reconnect_max_secs = 0.1", "reconnect_max_secs"),
        ("reconnect_max_secs = 0.5", "reconnect_max_secs"),
        ("reconnect_max_secs = inf", "reconnect_max_secs"),
    ] {
        match resolved(extra) {
            Err(e) if e.field == field => {}
            Err(e) => wrong.push(format!("{extra}: names {} ({e})", e.field)),
            Ok(_) => wrong.push(format!("{extra}: accepted")),
        }
    }
    for extra in [
        "discovery_interval_secs = 1\nreconnect_max_secs = 1",
        "discovery_interval_secs = 30\nreconnect_max_secs = 30",
    ] {
        if let Err(e) = resolved(extra) {
            wrong.push(format!("{extra}: refused ({e})"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn read_names_the_file() {
    let e = FileConfig::read(Path::new("/nonexistent/provide.toml"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/provide.toml"), "{e}");
}

#[test]
fn the_example_config_is_valid() {
    let text = include_str!("../../../../deploy/provide.example.toml");
    let file: FileConfig = toml::from_str(text).unwrap();
    let mut o = over(None, &[]);
    o.token = Some("pt-x".into());
    let c = resolve(&o, file, paths()).unwrap();
    let p = &c.policy;
    assert_eq!(p.models[0].public_name.as_str(), "qwen2.5:7b");
    assert!(p.schedule.is_some() && p.busy.is_some());
    assert_eq!(p.limits.max_concurrency, Some(4));
    assert_eq!(p.profile.groups, ["friends"]);
    assert_eq!(p.journal.retention_days, 90);
    // The reload parser reads the same file, and an override still wins.
    let mut o = over(Some("http://h"), &["http://x"]);
    o.token = Some("t".into());
    o.max_concurrency = Some(2);
    o.config_path = Some(PathBuf::from("unused"));
    let c = resolve(&o, FileConfig::default(), paths()).unwrap();
    let parse = c.policy_source.unwrap().parse;
    assert_eq!(parse(text).unwrap().limits.max_concurrency, Some(2));
    assert!(parse("[limits]\nbogus = 1\n").is_err());
}

/// A typo on a line holding a secret (an unterminated string, a key given twice, a
/// value of the wrong type) is reported by its line and key, never by quoting the line:
/// the error goes to the log and the status answer.
#[test]
fn a_config_error_never_quotes_the_line_with_the_secret() {
    let cases = [
        ("hub = \"http://h:1\"\ntoken = \"pt_SECRET1\n", "line 2"),
        ("token = \"pt_SECRET1\"\ntoken = \"pt_SECRET2\"\n", "line 2"),
        (
            "[[backends]]\nurl = \"http://x\"\napi_key = [\"sk-SECRET3\", 1]\n",
            "line 3",
        ),
        // A secret on the wrong line, or a number where text belongs: the message names
        // the value itself.
        ("max_concurrency = \"SECRET4\"\n", "line 1"),
        ("token = 1234567890\n", "line 1"),
        (
            "[[backends]]\nurl = \"http://x\"\napi_key = 98765432109\n",
            "line 3",
        ),
    ];
    for (text, line) in cases {
        let Err(e) = toml::from_str::<FileConfig>(text) else {
            panic!("{text} parsed")
        };
        let secret = ["SECRET", "1234567890", "98765432109"]
            .into_iter()
            .find(|s| text.contains(s))
            .unwrap();
        assert!(
            e.to_string().contains(secret),
            "positive control: toml quotes it: {e}"
        );
        let said = crate::file::toml_error(text, e);
        assert!(!said.contains(secret), "{said}");
        assert!(said.contains(line), "{said}");
        let said = crate::policy::PolicyFile::parse_toml(text).unwrap_err();
        assert!(!said.contains(secret), "{said}");
    }
}
