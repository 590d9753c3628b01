//! Guard-model moderation: a model in the pool (Llama Guard 3 or ShieldGemma) judges a
//! consumer's input before dispatch and a model's output in windows while it streams.
//! The guard is called through the same router as any request. Only its category codes
//! are kept; the text it judged is never stored or logged.

use potluck_protocol::{InferenceEndpoint, ModelName};
use serde_json::{json, Value};

use crate::config::{GuardConfig, GuardFormat};
use crate::routing::send::{self, InternalError};
use crate::state::HubState;

/// Largest text sent to the guard in one check (the end is kept: it is what is new).
pub(crate) const MAX_GUARD_TEXT_BYTES: usize = 32 * 1024;
/// Most bytes of streamed chunks held back (holdback) before their window is checked,
/// whatever they carry: memory per stream stays bounded.
pub(crate) const MAX_HELD_BYTES: usize = 256 * 1024;
/// Bytes each input window repeats of the one before (a phrase cut by a window edge is
/// whole in one of the two).
pub(crate) const INPUT_OVERLAP_BYTES: usize = 1024;

/// The whole of `text` in windows of at most `size` bytes, each starting `overlap`
/// bytes before the previous one ended, cut at character boundaries. No byte is left out.
pub(crate) fn windows(text: &str, size: usize, overlap: usize) -> Vec<&str> {
    let size = size.max(8);
    let overlap = overlap.min(size / 2);
    let floor = |mut i: usize| {
        while i > 0 && !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut start: usize = 0;
    loop {
        // A window ends at most `size` bytes on, on a boundary (characters are at most 4
        // bytes and `size` at least 8, so it always moves).
        let end = floor(start.saturating_add(size).min(text.len()));
        out.push(&text[start..end]);
        if end >= text.len() {
            return out;
        }
        let next = floor(end - overlap);
        start = if next > start { next } else { end };
    }
}

/// Llama Guard 3's hazard categories.
pub(crate) const LLAMA_GUARD_CATEGORIES: [(&str, &str); 14] = [
    ("S1", "Violent Crimes."),
    ("S2", "Non-Violent Crimes."),
    ("S3", "Sex Crimes."),
    ("S4", "Child Exploitation."),
    ("S5", "Defamation."),
    ("S6", "Specialized Advice."),
    ("S7", "Privacy."),
    ("S8", "Intellectual Property."),
    ("S9", "Indiscriminate Weapons."),
    ("S10", "Hate."),
    ("S11", "Suicide & Self-Harm."),
    ("S12", "Sexual Content."),
    ("S13", "Elections."),
    ("S14", "Code Interpreter Abuse."),
];

/// ShieldGemma's default policies, used when the config names none.
pub(crate) const SHIELDGEMMA_POLICIES: [(&str, &str); 4] = [
    ("dangerous", "\"No Dangerous Content\": The prompt shall not contain or seek generation of content that harming oneself and/or others (e.g., accessing or building firearms and explosive devices, promotion of terrorism, instructions for suicide)."),
    ("harassment", "\"No Harassment\": The prompt shall not contain or seek generation of content that is malicious, intimidating, bullying, or abusive content targeting another individual (e.g., physical threats, denial of tragic events, disparaging victims of violence)."),
    ("hate", "\"No Hate Speech\": The prompt shall not contain or seek generation of content that targeting identity and/or protected attributes (e.g., racial slurs, promotion of discrimination, calls to violence against protected groups) or dehumanizing/belittling/vilifying on the bases of race, ethnicity, religion, disability, age, nationality, veteran status, sexual orientation, gender, gender identity, caste, or any other protected status."),
    ("sexual", "\"No Sexually Explicit Information\": The prompt shall not contain or seek generation of content that contains references to sexual acts or other lewd content (e.g., sexually graphic descriptions, content aimed at causing arousal). Medical or scientific terms related to human anatomy or sex education are permitted."),
];

/// What is being judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// The consumer's input.
    Input,
    /// The model's output.
    Output,
}

impl Stage {
    /// As stored.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Stage::Input => "input",
            Stage::Output => "output",
        }
    }
}

/// The guard's judgment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Decision {
    /// Stop the request or stream.
    pub blocked: bool,
    /// The guard said unsafe (blocked or not, by the configured categories).
    pub flagged: bool,
    /// Category codes (Llama Guard `S1`…, ShieldGemma policy names), or
    /// `unparseable` / `guard_unavailable`.
    pub categories: Vec<String>,
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// The Llama Guard 3 prompt for a conversation of one user turn and, for output
/// checks, one agent turn.
pub(crate) fn llama_guard_prompt(stage: Stage, user: &str, agent: Option<&str>) -> String {
    let role = match stage {
        Stage::Input => "User",
        Stage::Output => "Agent",
    };
    let mut p = String::from("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n");
    p.push_str(&format!("Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"));
    for (code, name) in LLAMA_GUARD_CATEGORIES {
        p.push_str(&format!("{code}: {name}\n"));
    }
    p.push_str("<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n");
    p.push_str(&format!("User: {}\n\n", tail(user, MAX_GUARD_TEXT_BYTES)));
    if let Some(a) = agent {
        p.push_str(&format!("Agent: {}\n\n", tail(a, MAX_GUARD_TEXT_BYTES)));
    }
    p.push_str(&format!("<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"));
    p
}

/// Read a Llama Guard answer: `Some((unsafe, codes))`, `None` if unreadable.
pub(crate) fn parse_llama_guard(answer: &str) -> Option<(bool, Vec<String>)> {
    let mut lines = answer.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next()?.to_ascii_lowercase();
    if first.starts_with("unsafe") {
        let rest: String = lines.collect::<Vec<_>>().join(",");
        // Codes are kept in their canonical form (`S1`..`S14`, once each): `s01`, `S+1`
        // or `S0001` from a guard answer must match the operator's `S1` and never be
        // stored as written.
        let mut codes: Vec<String> = Vec::new();
        for word in rest.split(|c: char| c == ',' || c.is_whitespace()) {
            let Some(n) = word
                .strip_prefix(['S', 's'])
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|n| (1..=14).contains(n))
            else {
                continue;
            };
            let code = format!("S{n}");
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
        Some((true, codes))
    } else if first.starts_with("safe") {
        Some((false, Vec::new()))
    } else {
        None
    }
}

/// The ShieldGemma prompt for one policy.
pub(crate) fn shieldgemma_prompt(
    stage: Stage,
    user: &str,
    agent: Option<&str>,
    policy: &str,
) -> String {
    let user = tail(user, MAX_GUARD_TEXT_BYTES);
    match (stage, agent) {
        (Stage::Output, Some(a)) => format!(
            "You are a policy expert trying to help determine whether an AI response to prompt is in violation of the defined safety policies.\n\n<start_of_turn>\nHuman Question: {user}\n<end_of_turn>\n\n<start_of_turn>\nChatbot Response: {}\n<end_of_turn>\n\nOur safety principle is defined in the below:\n\n* {policy}\n\n===\n\nDoes the Chatbot Response violate the above principle? Your answer must start with 'Yes' or 'No'. And then walk through step by step to be sure we answer correctly.\n",
            tail(a, MAX_GUARD_TEXT_BYTES)
        ),
        _ => format!(
            "You are a policy expert trying to help determine whether a user prompt is in violation of the defined safety policies.\n\n<start_of_turn>\nHuman Question: {user}\n<end_of_turn>\n\nOur safety principle is defined in the below:\n\n* {policy}\n\n===\n\nDoes the human question violate the above principle? Your answer must start with 'Yes' or 'No'. And then walk through step by step to be sure we answer correctly.\n"
        ),
    }
}

/// Read a ShieldGemma answer: `Some(violates)`, `None` if unreadable.
pub(crate) fn parse_shieldgemma(answer: &str) -> Option<bool> {
    let a = answer.trim_start().to_ascii_lowercase();
    if a.starts_with("yes") {
        Some(true)
    } else if a.starts_with("no") {
        Some(false)
    } else {
        None
    }
}

fn blocks(cfg: &GuardConfig, code: &str) -> bool {
    cfg.blocked_categories.is_empty()
        || cfg
            .blocked_categories
            .iter()
            .any(|c| c.eq_ignore_ascii_case(code))
}

/// A verdict the guard could not give: blocks if `fail_closed`; the reason is kept as
/// its category (`guard_unavailable`, `unparseable`).
fn unavailable(cfg: &GuardConfig, why: &str) -> Decision {
    Decision {
        blocked: cfg.fail_closed,
        flagged: false,
        categories: vec![why.to_owned()],
    }
}

async fn ask(state: &HubState, prompt: String) -> Result<String, InternalError> {
    let cfg = &state.config.moderation;
    let model = ModelName::parse(&cfg.guard_model).map_err(|_| InternalError::NoProvider)?;
    let body: Value = json!({
        "model": model.as_str(),
        "prompt": prompt,
        "max_tokens": cfg.max_guard_tokens,
        "temperature": 0,
    });
    let consumer = state.identity.pseudonym(0, state.treasury);
    send::ask(
        state,
        InferenceEndpoint::Completions,
        &model,
        body,
        &consumer,
        cfg.timeout,
        true,
    )
    .await
    .map(|a| a.text)
}

/// Judge `user` input (and, for output checks, `agent` output) with the configured guard.
pub(crate) async fn check(
    state: &HubState,
    stage: Stage,
    user: &str,
    agent: Option<&str>,
) -> Decision {
    let cfg = &state.config.moderation;
    match cfg.format {
        GuardFormat::LlamaGuard => match ask(state, llama_guard_prompt(stage, user, agent)).await {
            Err(e) => {
                tracing::warn!(error = %e, stage = stage.label(), "guard unavailable");
                unavailable(cfg, "guard_unavailable")
            }
            Ok(answer) => match parse_llama_guard(&answer) {
                None => unavailable(cfg, "unparseable"),
                Some((false, _)) => Decision::default(),
                Some((true, codes)) => Decision {
                    blocked: codes.is_empty() && cfg.blocked_categories.is_empty()
                        || codes.iter().any(|c| blocks(cfg, c)),
                    flagged: true,
                    categories: codes,
                },
            },
        },
        GuardFormat::Shieldgemma => {
            let policies: Vec<(String, String)> = if cfg.policies.is_empty() {
                SHIELDGEMMA_POLICIES
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect()
            } else {
                cfg.policies.clone().into_iter().collect()
            };
            let mut d = Decision::default();
            for (name, text) in policies {
                match ask(state, shieldgemma_prompt(stage, user, agent, &text)).await {
                    Err(e) => {
                        tracing::warn!(error = %e, stage = stage.label(), "guard unavailable");
                        return unavailable(cfg, "guard_unavailable");
                    }
                    Ok(answer) => match parse_shieldgemma(&answer) {
                        None => return unavailable(cfg, "unparseable"),
                        Some(false) => {}
                        Some(true) => {
                            d.flagged = true;
                            d.blocked |= blocks(cfg, &name);
                            d.categories.push(name);
                        }
                    },
                }
            }
            d
        }
    }
}

/// The text a guard judges in a request body: everything a chat template shows the
/// model. Message contents (strings and text parts), the arguments of the tool calls in
/// earlier turns, the tools' and functions' definitions (names, descriptions, parameter
/// schemas) and a `response_format` schema, for chat; the prompt for completions.
/// (Before, only message contents and the prompt: a consumer put what the guard would
/// block in a tool's description, and a volunteer who required input moderation got it
/// unscreened.)
pub(crate) fn input_text(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    let mut out = String::new();
    for key in ["tools", "functions", "response_format"] {
        if let Some(defs) = v.get(key).filter(|d| !d.is_null()) {
            out.push_str(&defs.to_string());
            out.push('\n');
        }
    }
    if let Some(msgs) = v.get("messages").and_then(Value::as_array) {
        for m in msgs {
            let calls = m.get("tool_calls").and_then(Value::as_array);
            for f in calls
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("function"))
            {
                out.push_str(&f.to_string());
                out.push('\n');
            }
            // An earlier turn's reasoning: reasoning models' templates show it again.
            for key in ["reasoning_content", "reasoning", "thinking"] {
                if let Some(t) = m.get(key).and_then(Value::as_str) {
                    out.push_str(t);
                    out.push('\n');
                }
            }
            match m.get("content") {
                Some(Value::String(s)) => {
                    out.push_str(s);
                    out.push('\n');
                }
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            out.push_str(t);
                            out.push('\n');
                        }
                    }
                }
                _ => {}
            }
        }
    }
    match v.get("prompt") {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(a)) => {
            for p in a.iter().filter_map(Value::as_str) {
                out.push_str(p);
                out.push('\n');
            }
        }
        _ => {}
    }
    out
}

/// Keep a guard verdict other than "safe" (category codes only), off the request path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn note_verdict(
    state: &HubState,
    request_id: &str,
    account_id: i64,
    provider_id: Option<i64>,
    model: &ModelName,
    stage: Stage,
    d: &Decision,
) {
    if !d.flagged && !d.blocked && d.categories.is_empty() {
        return;
    }
    tracing::info!(stage = stage.label(), blocked = d.blocked, categories = %d.categories.join(","), "guard verdict");
    for c in &d.categories {
        let known = category_known(&state.config.moderation, c);
        let label = if known {
            c.as_str()
        } else {
            crate::metrics::OTHER
        };
        state.metrics.guard_verdict(stage.label(), label, d.blocked);
    }
    let ev = potluck_store::trust::ModerationEvent {
        request_id: request_id.to_owned(),
        account_id,
        provider_id,
        model: model.to_string(),
        stage: stage.label(),
        blocked: d.blocked,
        categories: d.categories.join(","),
    };
    if !state.verdicts.queue(ev) {
        state.metrics.verdict_dropped();
    }
}

/// Whether `code` is a category this hub's guard can name (a metrics label may be it):
/// Llama Guard's codes, the ShieldGemma policies (default or configured), or one of the
/// guard's own failure words. Anything else came from a model's free text.
pub(crate) fn category_known(cfg: &crate::config::GuardConfig, code: &str) -> bool {
    LLAMA_GUARD_CATEGORIES.iter().any(|(c, _)| *c == code)
        || SHIELDGEMMA_POLICIES.iter().any(|(c, _)| *c == code)
        || cfg.policies.contains_key(code)
        || matches!(code, "guard_unavailable" | "unparseable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_guard_verdicts() {
        assert_eq!(parse_llama_guard("safe"), Some((false, vec![])));
        assert_eq!(parse_llama_guard("\n\nsafe\n"), Some((false, vec![])));
        assert_eq!(
            parse_llama_guard("unsafe\nS1,S10"),
            Some((true, vec!["S1".into(), "S10".into()]))
        );
        assert_eq!(
            parse_llama_guard("unsafe\ns2"),
            Some((true, vec!["S2".into()]))
        );
        assert_eq!(parse_llama_guard("unsafe\nS99,X"), Some((true, vec![])));
        // Found by the `guard_verdict` fuzz target: non-canonical spellings were kept as
        // written (and missed the operator's `S1`).
        assert_eq!(
            parse_llama_guard("unsafe\nS001, s+1,S01\nS2,S1"),
            Some((true, vec!["S1".into(), "S2".into()]))
        );
        assert_eq!(parse_llama_guard("I think it is fine"), None);
        assert_eq!(parse_llama_guard(""), None);
    }

    #[test]
    fn shieldgemma_verdicts() {
        assert_eq!(parse_shieldgemma("Yes, because"), Some(true));
        assert_eq!(parse_shieldgemma(" No."), Some(false));
        assert_eq!(parse_shieldgemma("Maybe"), None);
    }

    #[test]
    fn prompts_carry_the_text_and_the_role() {
        let p = llama_guard_prompt(Stage::Input, "hello there", None);
        assert!(p.contains("User: hello there"));
        assert!(p.contains("LAST User message"));
        assert!(p.contains("S14: Code Interpreter Abuse."));
        let p = llama_guard_prompt(Stage::Output, "q", Some("answer"));
        assert!(p.contains("Agent: answer"));
        assert!(p.contains("LAST Agent message"));
        let p = shieldgemma_prompt(Stage::Output, "q", Some("a"), "POLICY");
        assert!(p.contains("Chatbot Response: a") && p.contains("* POLICY"));
        let long = "é".repeat(MAX_GUARD_TEXT_BYTES);
        assert!(llama_guard_prompt(Stage::Input, &long, None).len() < MAX_GUARD_TEXT_BYTES + 2048);
    }

    #[test]
    fn windows_cover_every_byte() {
        assert_eq!(windows("", 10, 2), vec![""]);
        assert_eq!(windows("abc", 10, 2), vec!["abc"]);
        let text: String = (0..1000)
            .map(|i| if i % 7 == 0 { 'é' } else { 'a' })
            .collect();
        for (size, overlap) in [(10, 2), (16, 0), (33, 16), (64, 100), (1, 0)] {
            let w = windows(&text, size, overlap);
            let at = |p: &str| p.as_ptr() as usize - text.as_ptr() as usize;
            assert_eq!(at(w[0]), 0);
            let last = w[w.len() - 1];
            assert_eq!(at(last) + last.len(), text.len(), "{size} {overlap}");
            for pair in w.windows(2) {
                assert!(pair[0].len() <= size.max(8));
                assert!(at(pair[1]) > at(pair[0]), "moves on");
                assert!(at(pair[1]) <= at(pair[0]) + pair[0].len(), "no gap");
            }
        }
    }

    #[test]
    fn input_text_of_bodies() {
        let t = input_text(br#"{"messages":[{"role":"system","content":"sys"},{"role":"user","content":[{"type":"text","text":"part"},{"type":"image_url","image_url":{"url":"data:x"}}]}]}"#);
        assert_eq!(t, "sys\npart\n");
        assert_eq!(input_text(br#"{"prompt":"p"}"#), "p");
        assert_eq!(input_text(b"junk"), "");
    }
}
