use super::*;

#[test]
fn scale_out_settings_refuse_their_worst_values() {
    for (toml, field) in [
        ("presence_interval = 0", "presence_interval"),
        ("[credits]\nlease_ttl = 0.5", "lease_ttl"),
        ("[routing]\nevents_linger = 3600", "events_linger"),
        ("[routing]\nhello_timeout = 0", "hello_timeout"),
        ("[routing]\nhello_timeout = 3600", "hello_timeout"),
        (
            "[routing]\nmax_offer_changes_per_minute = 0",
            "max_offer_changes_per_minute",
        ),
        ("usage_batch_window = 60", "usage_batch_window"),
    ] {
        let c: HubConfig = toml::from_str(toml).unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains(field), "{toml}: {e}");
    }
    assert!(HubConfig::default().validate().is_ok());
}

#[test]
fn answer_bounds_refuse_their_worst_values() {
    for (toml, field) in [
        ("max_tool_calls = 0", "max_tool_calls"),
        (
            "max_buffered_answer_bytes = 1024",
            "max_buffered_answer_bytes",
        ),
    ] {
        let c: HubConfig = toml::from_str(toml).unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains(field), "{toml}: {e}");
    }
}

#[test]
fn toml_fields_and_errors() {
    let c: HubConfig =
        toml::from_str("listen = \"0.0.0.0:9000\"\nstream_idle_timeout = 2.5").unwrap();
    assert_eq!(c.listen.port(), 9000);
    assert_eq!(c.stream_idle_timeout, Duration::from_millis(2500));
    let e = toml::from_str::<HubConfig>("max_request_bytes = \"big\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_request_bytes"), "{e}");
    let e = toml::from_str::<HubConfig>("nope = 1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
    let c: HubConfig =
        toml::from_str("[accounts]\nmode = \"approval\"\n[retention]\nusage_days = 7").unwrap();
    assert_eq!(c.accounts.mode, JoinMode::Approval);
    assert_eq!(c.retention.usage_days, 7);
    assert_eq!(HubConfig::default().accounts.mode, JoinMode::Invite);
    let e = toml::from_str::<HubConfig>("[accounts]\nmode = \"closed\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("open") && e.contains("approval"), "{e}");
}

#[test]
fn guard_and_spot_check_tables_take_old_and_new_names() {
    for table in ["moderation", "guard"] {
        let c: HubConfig = toml::from_str(&format!(
            "[{table}]\nguard_model = \"g\"\nwindow_tokens = 7"
        ))
        .unwrap();
        assert_eq!(c.moderation.guard_model, "g", "[{table}]");
        assert_eq!(c.moderation.window_tokens, 7, "[{table}]");
    }
    for table in ["audit", "spot_checks"] {
        let c: HubConfig = toml::from_str(&format!("[{table}]\nrate = 0.5")).unwrap();
        assert_eq!(c.audit.rate, 0.5, "[{table}]");
    }
    let e = toml::from_str::<HubConfig>("[guard]\nguard_modell = \"g\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("guard_modell"), "{e}");
}

/// Money settings TOML can write as `nan` or `inf`, or negative: each refused with its
/// name. Before, only two of them were checked, and only against negatives (a NaN
/// compares false): `high_priority_balance = nan` read as 0 gave every account high
/// priority, `trust_threshold = -1` let every old account skip escrow, and
/// `starter_grant = inf` granted the largest amount there is.
#[test]
fn money_settings_refuse_nan_infinity_and_negatives() {
    for (toml, field) in [
        ("[credits]\nstarter_grant = inf", "starter_grant"),
        ("[credits]\nstarter_grant = 1e12", "starter_grant"),
        ("[credits]\ntrust_threshold = nan", "trust_threshold"),
        ("[credits]\ntrust_threshold = -1.0", "trust_threshold"),
        (
            "[credits]\nhigh_priority_balance = nan",
            "high_priority_balance",
        ),
        ("[credits]\ntax_per_request = nan", "tax_per_request"),
        (
            "[credits.classes.small]\nprompt = -1\ncompletion = 1",
            "small",
        ),
        ("[audit]\nfail_factor = nan", "fail_factor"),
        ("[audit]\npass_reward = 2.0", "pass_reward"),
        ("[audit.max_tokens_per_sec]\nsmall = nan", "small"),
    ] {
        let c: HubConfig = toml::from_str(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
        let e = c.validate().unwrap_err();
        assert!(e.contains(field), "{toml}: {e}");
    }
}
