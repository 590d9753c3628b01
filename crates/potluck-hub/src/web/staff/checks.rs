//! A provider's spot checks as the staff page's providers table shows them.

use potluck_protocol::admin::SpotCheckTally;

/// A provider's spot checks in two cells: its replays judged, of those run or dropped
/// (not of all sampled requests: one that ended in an error or was filtered by the guard
/// is not replayed, nor counted), with the share; and the checks of every kind that gave
/// no verdict, by reason (`-` for none).
pub(super) fn spot_check_cells(checks: &[SpotCheckTally]) -> (String, String) {
    let judged = checks.iter().find(|t| t.kind == "replay").map_or_else(
        || "-".to_owned(),
        |t| {
            let not = t
                .not_judged
                .iter()
                .fold(0_i64, |sum, n| sum.saturating_add(n.count));
            format!(
                "{} of {} ({:.0}%)",
                t.judged,
                t.judged.saturating_add(not),
                t.judged_share * 100.0
            )
        },
    );
    let not_judged: Vec<String> = checks
        .iter()
        .filter(|t| !t.not_judged.is_empty())
        .map(|t| {
            let reasons: Vec<String> = t
                .not_judged
                .iter()
                .map(|n| format!("{} {}", n.reason, n.count))
                .collect();
            format!("{}: {}", t.kind, reasons.join(", "))
        })
        .collect();
    let not_judged = if not_judged.is_empty() {
        "-".to_owned()
    } else {
        not_judged.join("; ")
    };
    (judged, not_judged)
}
