//! How an audited answer is compared with a trusted reference's: the words it said
//! (text, then tool calls), whether it appended to a complete answer, and whether its
//! bill goes past what the reference counted for the same body. Pure functions of the
//! two answers and the audit settings; the spot checks (`trust::spot_checks`) run them.

use crate::config::SpotCheckConfig;
use crate::routing::calls::Calls;
use crate::routing::send::Answer;
use crate::trust::plausibility::Usage;
use crate::trust::sample::prefix;

/// Agreement of two answers over their first `k` words: the common prefix over the
/// longer of the two (capped at `k`). Two empty answers agree.
pub(crate) fn agreement(a: &str, b: &str, k: usize) -> f64 {
    let wa: Vec<&str> = a.split_whitespace().take(k).collect();
    let wb: Vec<&str> = b.split_whitespace().take(k).collect();
    let denom = wa.len().max(wb.len());
    if denom == 0 {
        return 1.0;
    }
    let prefix = wa.iter().zip(&wb).take_while(|(x, y)| x == y).count();
    prefix as f64 / denom as f64
}

/// Words an audited answer may add after the reference's complete answer.
pub(crate) const MAX_APPENDED_WORDS: usize = 2;

/// Whether `a` is the whole of `b` plus text appended to it. Both runs had the same
/// `max_tokens`, so an honest provider cannot go on where the reference stopped (an
/// injected signature or advertisement at the end of answers does).
pub(crate) fn appended(a: &str, b: &str) -> bool {
    let wa: Vec<&str> = a.split_whitespace().collect();
    let wb: Vec<&str> = b.split_whitespace().collect();
    !wb.is_empty() && wa.len() > wb.len() + MAX_APPENDED_WORDS && wa.starts_with(&wb)
}

/// What an answer said, as audits compare it: its text and its tool calls.
#[derive(Clone, Copy)]
pub(crate) struct Said<'a> {
    pub(crate) text: &'a str,
    pub(crate) calls: &'a Calls,
}

impl<'a> Said<'a> {
    pub(crate) fn of(answer: &'a Answer) -> Self {
        Self {
            text: &answer.text,
            calls: &answer.calls,
        }
    }

    /// The text the words are compared on: the text (up to `cap`), then each tool call's
    /// name and arguments.
    pub(crate) fn words(self, cap: usize) -> String {
        let mut w = prefix(self.text, cap).to_owned();
        w.push_str(&self.calls.render());
        w
    }
}

/// The verdict on one replay or canary, `a` the audited answer, `b` the reference's:
/// (passed, agreement). Text past `audit.max_text_bytes` is not compared, and appended
/// text counts only against a reference that ended by itself (not at its length limit
/// or the byte cap, where an honest answer may go on). Tool calls are compared in the
/// words (their names and arguments after the text) and, where the reference serves the
/// audited provider's very model file (`same_file`), must also be the very calls the
/// reference made (a call is an action the consumer's client takes: another command, or
/// a call where the reference made none, is another answer however few words differ),
/// unless the reference was cut at its length limit. `None`, no verdict, where the calls
/// differ but the reference serves another file (another quantisation of the model, or
/// a provider that announced no hash: it may honestly call otherwise, and a pass on the
/// words alone would let a liar's own call through), or where arguments cut at the cap
/// can no longer be compared.
pub(crate) fn verdict(
    cfg: &SpotCheckConfig,
    a: Said<'_>,
    b: Said<'_>,
    b_cut: bool,
    same_file: bool,
) -> Option<(bool, f64)> {
    let cap = cfg.max_text_bytes;
    let b_cut = b_cut || b.text.len() >= cap;
    let (aw, bw) = (a.words(cap), b.words(cap));
    let g = agreement(&aw, &bw, cfg.compare_tokens);
    let same_calls = match (b_cut, a.calls.compare(b.calls)) {
        (true, _) | (false, Some(true)) => true,
        (false, None) => return None,
        (false, Some(false)) if !same_file => return None,
        (false, Some(false)) => false,
    };
    Some((
        g >= cfg.min_agreement && same_calls && (b_cut || !appended(&aw, &bw)),
        g,
    ))
}

/// How a delivered answer compares with the reference's, for the bill check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Likeness {
    /// Not comparable (several choices, the delivered answer's text cut at the audit
    /// byte cap, `audit.max_text_bytes`, or reasoning on either side, billed but not
    /// measured): its completion is not judged. An answer that
    /// ended at its length limit is comparable: all its text was kept.
    Unknown,
    /// The same text and calls, whitespace aside.
    Same,
    /// Another text: the lengths of both (bytes, whitespace collapsed).
    Other {
        /// The delivered answer's.
        delivered: usize,
        /// The reference's.
        reference: usize,
    },
}

impl Likeness {
    pub(crate) fn of(a: Said<'_>, b: Said<'_>, cap: usize) -> Self {
        let (aw, bw) = (a.words(cap), b.words(cap));
        if aw.split_whitespace().eq(bw.split_whitespace()) {
            return Self::Same;
        }
        Self::Other {
            delivered: collapsed_len(&aw),
            reference: collapsed_len(&bw),
        }
    }
}

/// Bytes of `t` with its whitespace collapsed to single spaces and trimmed.
pub(crate) fn collapsed_len(t: &str) -> usize {
    let (words, bytes) = t.split_whitespace().fold((0usize, 0usize), |(n, b), w| {
        (n + 1, b.saturating_add(w.len()))
    });
    bytes.saturating_add(words.saturating_sub(1))
}

/// The honest variance a bill may show over the reference's counts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BillSlack {
    /// `audit.completion_ratio`.
    pub(crate) ratio: f64,
    /// `audit.completion_slack_tokens`.
    pub(crate) slack: i64,
    /// `credits.prompt_overhead_tokens`.
    pub(crate) prompt_overhead: i64,
}

impl BillSlack {
    pub(crate) fn of(cfg: &SpotCheckConfig, prompt_overhead: i64) -> Self {
        Self {
            ratio: cfg.completion_ratio,
            slack: cfg.completion_slack_tokens,
            prompt_overhead,
        }
    }
}

/// Whether `billed` is more than a trusted reference reported for the same body on the
/// same model file: its prompt tokens (the same text through the same tokenizer, but
/// maybe another server's template: a default system prompt, tools rendered otherwise;
/// beyond half again the reference's count plus the prompt overhead), and, where the
/// reference ended by itself and neither text passed the cap, its completion tokens
/// ([`completion_bound`]). A reference that reported nothing proves nothing.
pub(crate) fn usage_over_reference(
    billed: Usage,
    reference: &Answer,
    likeness: Likeness,
    slack: &BillSlack,
) -> bool {
    let prompt_bound = reference
        .prompt_tokens
        .saturating_mul(3)
        .saturating_div(2)
        .saturating_add(slack.prompt_overhead.max(0));
    let prompt = reference.prompt_tokens > 0 && billed.prompt > prompt_bound;
    let completion = !reference.cut_at_length
        && reference.completion_tokens > 0
        && completion_bound(reference.completion_tokens, likeness, slack)
            .is_some_and(|bound| billed.completion > bound);
    prompt || completion
}

/// The most completion tokens an honest provider may bill where the reference counted
/// `counted` for its answer: for the same text, `counted` plus the slack; for another,
/// `counted` scaled by the delivered length over the reference's (when longer), times
/// the ratio, plus the slack. `None`: not judged (not comparable, or the reference said
/// nothing to scale by).
pub(crate) fn completion_bound(counted: i64, likeness: Likeness, slack: &BillSlack) -> Option<i64> {
    let base = match likeness {
        Likeness::Unknown => return None,
        Likeness::Same => counted,
        Likeness::Other { reference: 0, .. } => return None,
        Likeness::Other {
            delivered,
            reference,
        } => {
            // usize fits i128 on every target; a product past it bounds nothing.
            let (longer, reference) = (
                i128::try_from(delivered.max(reference)).unwrap_or(i128::MAX),
                i128::try_from(reference).unwrap_or(i128::MAX),
            );
            let scaled = i128::from(counted)
                .checked_mul(longer)
                .and_then(|p| p.checked_div(reference))
                .map_or(i64::MAX, |v| i64::try_from(v).unwrap_or(i64::MAX));
            let times = (scaled as f64 * slack.ratio).ceil();
            if times.is_finite() && times < i64::MAX as f64 {
                times as i64
            } else {
                i64::MAX
            }
        }
    };
    Some(base.saturating_add(slack.slack.max(0)))
}
