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
        ("[credits]\ntokens_per_image = -1", "tokens_per_image"),
        ("[credits]\ntokens_per_image = 1000000", "tokens_per_image"),
        ("[credits]\ntokens_per_audio = -1", "tokens_per_audio"),
        ("[credits]\ntokens_per_audio = 1000000", "tokens_per_audio"),
    ] {
        let c: HubConfig = toml::from_str(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
        let e = c.validate().unwrap_err();
        assert!(e.contains(field), "{toml}: {e}");
    }
}

/// Values the hub used to accept and then panicked on (`clamp(1, 0)`, a zero
/// `tokio::time::interval`, a semaphore or channel past tokio's limit, a huge
/// `Vec::with_capacity`), spun on (a zero or tiny interval), or that silently turned a
/// protection off (a breaker that never cools down, audits that compare nothing, a
/// treasury alert at NaN), or made every provider look broken (a zero timeout or byte
/// cap): each is refused by `validate`, with the setting's full name in the error. The
/// lowest and highest values accepted, and `audit.canary_interval = 0` ("no canaries"),
/// still validate. A timeout under a tenth of a second (`0.001`: milliseconds meant,
/// seconds read) was accepted like any positive one and made honest peers time out.
#[test]
fn limits_that_panic_spin_or_disable_a_protection_are_refused() {
    // Past tokio's `Semaphore::MAX_PERMITS` (usize::MAX >> 3), still a TOML integer.
    const HUGE: &str = "4000000000000000000";
    let cases: Vec<(String, &str)> = vec![
        (
            "[audit]\ncanary_max_tokens = 0".into(),
            "audit.canary_max_tokens",
        ),
        (
            "[queue]\nprogress_interval = 0".into(),
            "queue.progress_interval",
        ),
        (
            "[queue]\nprogress_interval = 1e-9".into(),
            "queue.progress_interval",
        ),
        ("[routing]\npick_sample = 0".into(), "routing.pick_sample"),
        (
            format!("[routing]\npick_sample = {HUGE}"),
            "routing.pick_sample",
        ),
        (
            "[routing]\npick_sample = 1025".into(),
            "routing.pick_sample",
        ),
        (
            format!("[server]\nmax_key_lookups = {HUGE}"),
            "server.max_key_lookups",
        ),
        (
            "[server]\nmax_key_lookups = 0".into(),
            "server.max_key_lookups",
        ),
        (
            format!("[server]\nmax_member_reads = {HUGE}"),
            "server.max_member_reads",
        ),
        (
            "[server]\nmax_member_reads = 0".into(),
            "server.max_member_reads",
        ),
        (format!("usage_queue = {HUGE}"), "usage_queue"),
        ("usage_queue = 0".into(), "usage_queue"),
        (
            format!("[audit]\nmax_pending = {HUGE}"),
            "audit.max_pending",
        ),
        (
            "[audit]\nmax_body_bytes = 1023".into(),
            "audit.max_body_bytes",
        ),
        (
            format!("[audit]\nmax_body_bytes = {HUGE}"),
            "audit.max_body_bytes",
        ),
        (
            "[audit]\ncompletion_ratio = 0.5".into(),
            "audit.completion_ratio",
        ),
        (
            "[audit]\ncompletion_ratio = nan".into(),
            "audit.completion_ratio",
        ),
        (
            "[audit]\ncompletion_slack_tokens = -1".into(),
            "audit.completion_slack_tokens",
        ),
        (
            format!("[audit]\nembedding_slack_tokens = {HUGE}"),
            "audit.embedding_slack_tokens",
        ),
        (
            format!("[server]\nmax_connections = {HUGE}"),
            "server.max_connections",
        ),
        (
            "[alerting]\ncheck_interval = 0".into(),
            "alerting.check_interval",
        ),
        (
            "[alerting]\ncheck_interval = 0.001".into(),
            "alerting.check_interval",
        ),
        ("[alerting]\ntimeout = 0".into(), "alerting.timeout"),
        ("[routing]\ncooldown = 0".into(), "routing.cooldown"),
        (
            "[routing]\ncooldown = 60\nmax_cooldown = 30".into(),
            "routing.max_cooldown",
        ),
        ("[audit]\nmax_text_bytes = 0".into(), "audit.max_text_bytes"),
        ("[audit]\nmax_text_bytes = 1".into(), "audit.max_text_bytes"),
        ("[audit]\ncompare_tokens = 0".into(), "audit.compare_tokens"),
        (
            "[moderation]\nguard_model = \"g\"\ntimeout = 0".into(),
            "moderation.timeout",
        ),
        (
            "[moderation]\nguard_model = \" g\"".into(),
            "moderation.guard_model",
        ),
        (
            format!("[moderation]\nguard_model = \"{}\"", "g".repeat(300)),
            "moderation.guard_model",
        ),
        (
            "[moderation]\nguard_model = \"g\"\nmax_guard_tokens = 0".into(),
            "moderation.max_guard_tokens",
        ),
        (
            "[routing]\nfirst_byte_timeout = 0".into(),
            "routing.first_byte_timeout",
        ),
        (
            "provider_header_timeout = 0".into(),
            "provider_header_timeout",
        ),
        ("provider_body_timeout = 0".into(), "provider_body_timeout"),
        ("max_response_bytes = 0".into(), "max_response_bytes"),
        ("max_sse_line_bytes = 0".into(), "max_sse_line_bytes"),
        (
            "[server]\nheader_read_timeout = 0".into(),
            "server.header_read_timeout",
        ),
        (
            "[server]\nbody_read_timeout = 0".into(),
            "server.body_read_timeout",
        ),
        (
            "[audit]\ncanary_interval = 0.001".into(),
            "audit.canary_interval",
        ),
        ("[web]\nchart_cache = 0".into(), "web.chart_cache"),
        ("[web]\npage_rows = 0".into(), "web.page_rows"),
        (format!("[web]\npage_rows = {HUGE}"), "web.page_rows"),
        (
            "[web]\nsession_lifetime = 2592001".into(),
            "web.session_lifetime",
        ),
        (
            format!("[web]\nhistory_samples = {HUGE}"),
            "web.history_samples",
        ),
        (
            "[web]\nsample_interval = 0.01".into(),
            "web.sample_interval",
        ),
        ("[web]\nchart_cache = 0.5".into(), "web.chart_cache"),
        (
            "[alerting]\ntreasury_below = nan".into(),
            "alerting.treasury_below",
        ),
        (
            "[alerting]\ntreasury_below = inf".into(),
            "alerting.treasury_below",
        ),
        (
            "[alerting]\ntreasury_below = -inf".into(),
            "alerting.treasury_below",
        ),
        (
            "[alerting]\ntreasury_below = -1e15".into(),
            "alerting.treasury_below",
        ),
        (
            "[audit]\nmin_tokens_for_speed = 1".into(),
            "audit.min_tokens_for_speed",
        ),
        (
            "[audit]\nmin_tokens_for_speed = -5".into(),
            "audit.min_tokens_for_speed",
        ),
        (
            "provider_header_timeout = 0.001".into(),
            "provider_header_timeout",
        ),
        (
            "provider_body_timeout = 0.001".into(),
            "provider_body_timeout",
        ),
        ("stream_idle_timeout = 0.001".into(), "stream_idle_timeout"),
        (
            "stream_total_timeout = 0.001".into(),
            "stream_total_timeout",
        ),
        (
            "[routing]\nfirst_byte_timeout = 0.001".into(),
            "routing.first_byte_timeout",
        ),
        (
            "[routing]\nhello_timeout = 0.001".into(),
            "routing.hello_timeout",
        ),
        (
            "[server]\nheader_read_timeout = 0.001".into(),
            "server.header_read_timeout",
        ),
        (
            "[server]\nbody_read_timeout = 0.001".into(),
            "server.body_read_timeout",
        ),
        (
            "[server]\nconsumer_stall_timeout = 0.001".into(),
            "server.consumer_stall_timeout",
        ),
        ("[alerting]\ntimeout = 0.001".into(), "alerting.timeout"),
        (
            "[audit]\nanswer_timeout = 0.001".into(),
            "audit.answer_timeout",
        ),
        (
            "[moderation]\nguard_model = \"g\"\ntimeout = 0.05".into(),
            "moderation.timeout",
        ),
        (
            "[moderation]\nverdict_queue = 0".into(),
            "moderation.verdict_queue",
        ),
        (
            format!("[moderation]\nverdict_queue = {HUGE}"),
            "moderation.verdict_queue",
        ),
    ];
    let mut wrong = Vec::new();
    for (toml, field) in &cases {
        let c: HubConfig = toml::from_str(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
        match c.validate() {
            Err(e) if e.contains(field) => {}
            other => wrong.push(format!(
                "{toml:?} (want an error naming {field}): {other:?}"
            )),
        }
    }
    // The edges of each range, and the documented "off", are accepted.
    for toml in [
        "[audit]\ncanary_interval = 0",
        "[audit]\ncanary_interval = 1\ncanary_max_tokens = 1\nmin_tokens_for_speed = 16",
        "[queue]\nprogress_interval = 0.01",
        "[web]\nsession_lifetime = 2592000\npage_rows = 10000\nhistory_samples = 100000",
        "[web]\nsample_interval = 1\npage_rows = 1",
        "[routing]\npick_sample = 1024",
        "[routing]\npick_sample = 1",
        "[routing]\ncooldown = 30\nmax_cooldown = 30",
        "[server]\nmax_connections = 16777216",
        "usage_queue = 1",
        "usage_queue = 1048576",
        "[audit]\nmax_pending = 65536",
        "[alerting]\ncheck_interval = 0.05\ntreasury_below = -100000",
        "[web]\nchart_cache = 1",
        "[moderation]\nguard_model = \"llama-guard3:8b\"",
        "provider_header_timeout = 0.1\nprovider_body_timeout = 0.1\nstream_idle_timeout = 0.1\nstream_total_timeout = 0.1",
        "[server]\nheader_read_timeout = 0.1\nbody_read_timeout = 0.1\nconsumer_stall_timeout = 0.1",
        "[routing]\nfirst_byte_timeout = 0.1\nhello_timeout = 0.1",
    ] {
        if let Err(e) = toml::from_str::<HubConfig>(toml).unwrap().validate() {
            wrong.push(format!("{toml:?} must validate: {e}"));
        }
    }
    assert!(HubConfig::default().validate().is_ok());
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The scale-out example's settings parse and pass the checks, and keep the session
/// cookie to HTTPS (its hubs are reached through Caddy's TLS).
#[test]
fn the_scale_out_example_is_a_valid_config() {
    let text = include_str!("../../../../deploy/scale-out/hub.toml");
    let c: HubConfig = toml::from_str(text).expect("the example parses");
    c.validate().expect("the example passes the checks");
    assert!(c.web.secure_cookies);
}
