//! Abuse reports and what moderators see with them: who took part in a request and its
//! content-free metadata (from its usage row), filing, listing and resolving reports.
//!
//! Invariant: a report points at a request by its id and copies only the ids of who took
//! part; its only free text is what the reporter typed as its reason.

use sqlx::Row;

use crate::store::{Store, StoreError};

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Who took part in a request, from its usage row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Participants {
    /// The consumer account.
    pub account_id: i64,
    /// The consumer key.
    pub key_id: i64,
    /// The provider that served it, if any.
    pub provider_id: Option<i64>,
}

/// A request's content-free metadata, as shown to moderators with a report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestMeta {
    /// The hub's request id.
    pub request_id: String,
    /// Unix milliseconds.
    pub started_at_ms: i64,
    /// Consumer account id.
    pub account_id: i64,
    /// Consumer account name.
    pub account: Option<String>,
    /// Consumer key id.
    pub key_id: i64,
    /// Provider id.
    pub provider_id: Option<i64>,
    /// Provider name.
    pub provider: Option<String>,
    /// Model name.
    pub model: String,
    /// `chat`, `completions` or `embeddings`.
    pub endpoint: String,
    /// Streamed.
    pub stream: bool,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// HTTP status given to the consumer.
    pub status: i64,
    /// Outcome label.
    pub outcome: String,
    /// Milliseconds.
    pub duration_ms: i64,
}

/// A report as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReportRow {
    /// Id.
    pub id: i64,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    /// The reported request.
    pub request_id: String,
    /// The reporter's account.
    pub reporter_account: i64,
    /// The reporting provider, if a provider token filed it.
    pub reporter_provider: Option<i64>,
    /// What the reporter typed (capped).
    pub reason: String,
    /// The consumer account of the request.
    pub subject_account: i64,
    /// The consumer key of the request.
    pub subject_key: i64,
    /// The provider that served it.
    pub subject_provider: Option<i64>,
    /// `open` or `resolved`.
    pub status: String,
    /// The action taken (`dismiss`, `ban_account`, ...).
    pub resolution: Option<String>,
    /// Unix milliseconds.
    pub resolved_at_ms: Option<i64>,
}

impl Store {
    /// Who took part in a request (from its usage row), if the row exists.
    pub async fn participants(&self, request_id: &str) -> Result<Option<Participants>> {
        let r = sqlx::query(
            "SELECT account_id, key_id, provider_id FROM usage_records WHERE request_id = $1 ORDER BY id LIMIT 1",
        )
        .bind(request_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(r.map(|r| Participants {
            account_id: r.get(0),
            key_id: r.get(1),
            provider_id: r.get(2),
        }))
    }

    /// A request's content-free metadata, if its usage row is still kept.
    pub async fn request_meta(&self, request_id: &str) -> Result<Option<RequestMeta>> {
        let r = sqlx::query(
            "SELECT u.request_id, u.started_at_ms, u.account_id, a.name, u.key_id, u.provider_id, p.name, \
             u.model, u.endpoint, u.stream, u.prompt_tokens, u.completion_tokens, u.status, u.outcome, u.duration_ms \
             FROM usage_records u LEFT JOIN accounts a ON a.id = u.account_id LEFT JOIN providers p ON p.id = u.provider_id \
             WHERE u.request_id = $1 ORDER BY u.id LIMIT 1",
        )
        .bind(request_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(r.map(|r| RequestMeta {
            request_id: r.get(0),
            started_at_ms: r.get(1),
            account_id: r.get(2),
            account: r.get(3),
            key_id: r.get(4),
            provider_id: r.get(5),
            provider: r.get(6),
            model: r.get(7),
            endpoint: r.get(8),
            stream: r.get::<i64, _>(9) != 0,
            prompt_tokens: r.get(10),
            completion_tokens: r.get(11),
            status: r.get(12),
            outcome: r.get(13),
            duration_ms: r.get(14),
        }))
    }

    /// File a report about a request whose participants are known.
    pub async fn file_report(
        &self,
        request_id: &str,
        reporter_account: i64,
        reporter_provider: Option<i64>,
        reason: &str,
        subject: Participants,
    ) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO reports (created_at_ms, request_id, reporter_account, reporter_provider, reason, \
             subject_account, subject_key, subject_provider) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(crate::ledger::now_ms())
        .bind(request_id)
        .bind(reporter_account)
        .bind(reporter_provider)
        .bind(reason)
        .bind(subject.account_id)
        .bind(subject.key_id)
        .bind(subject.provider_id)
        .fetch_one(self.pool())
        .await?)
    }

    /// Reports, newest first, optionally only those with `status`.
    pub async fn list_reports(&self, status: Option<&str>, limit: i64) -> Result<Vec<ReportRow>> {
        let rows = sqlx::query(&format!(
            "{REPORT_COLUMNS} WHERE ($1 IS NULL OR status = $2) ORDER BY id DESC LIMIT $3"
        ))
        .bind(status)
        .bind(status)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(report_row).collect())
    }

    /// One report.
    pub async fn report(&self, id: i64) -> Result<ReportRow> {
        let r = sqlx::query(&format!("{REPORT_COLUMNS} WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(report_row(&r))
    }

    /// Reports filed by an account (with `provider`: by that provider's token).
    pub async fn reports_by(
        &self,
        account_id: i64,
        provider: Option<i64>,
        limit: i64,
    ) -> Result<Vec<ReportRow>> {
        let rows = sqlx::query(&format!(
            "{REPORT_COLUMNS} WHERE reporter_account = $1 AND reporter_provider IS NOT DISTINCT FROM $2 ORDER BY id DESC LIMIT $3"
        ))
        .bind(account_id)
        .bind(provider)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(report_row).collect())
    }

    /// Mark an open report resolved with `resolution`. `Conflict` if already resolved.
    pub async fn resolve_report(&self, id: i64, actor: i64, resolution: &str) -> Result<()> {
        let n = sqlx::query(
            "UPDATE reports SET status = 'resolved', resolution = $1, resolved_by = $2, resolved_at_ms = $3 \
             WHERE id = $4 AND status = 'open'",
        )
        .bind(resolution)
        .bind(actor)
        .bind(crate::ledger::now_ms())
        .bind(id)
        .execute(self.pool())
        .await?
        .rows_affected();
        if n == 0 {
            self.report(id).await?;
            return Err(StoreError::Conflict(
                "the report is already resolved".into(),
            ));
        }
        Ok(())
    }
}

const REPORT_COLUMNS: &str = "SELECT id, created_at_ms, request_id, reporter_account, reporter_provider, reason, \
     subject_account, subject_key, subject_provider, status, resolution, resolved_at_ms FROM reports";

fn report_row(r: &sqlx::any::AnyRow) -> ReportRow {
    ReportRow {
        id: r.get(0),
        created_at_ms: r.get(1),
        request_id: r.get(2),
        reporter_account: r.get(3),
        reporter_provider: r.get(4),
        reason: r.get(5),
        subject_account: r.get(6),
        subject_key: r.get(7),
        subject_provider: r.get(8),
        status: r.get(9),
        resolution: r.get(10),
        resolved_at_ms: r.get(11),
    }
}
