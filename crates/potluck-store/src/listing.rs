//! Pages of the lists staff read (accounts, consumer keys, providers, invites) and the
//! single rows a page about one of them needs.
//!
//! Invariant: no query here reads a whole table. Strangers grow these tables (a signup
//! flood of pending accounts, a member's keys, revoked rows kept for ever), so every list
//! is read a page at a time (`LIMIT`, after a cursor), and a page about one account or one
//! provider asks for that row alone.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::accounts::{split_groups, AccountInfo, InviteInfo};
use crate::store::{CredentialRecord, KeyRecord, ProviderRecord, Result, Role, Standing, Store};

/// Most rows one page may hold, whatever the caller asks.
pub const MAX_PAGE_ROWS: i64 = 10_000;

/// Where a page starts and how many rows it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageReq {
    /// The id of the last row of the page before (in the list's order); `None`: the first
    /// page.
    pub after: Option<i64>,
    /// Rows wanted (clamped to 1..=[`MAX_PAGE_ROWS`]).
    pub limit: i64,
}

impl PageReq {
    /// The first page of `limit` rows.
    pub fn first(limit: i64) -> Self {
        Self { after: None, limit }
    }

    fn rows(self) -> i64 {
        self.limit.clamp(1, MAX_PAGE_ROWS)
    }
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The rows, in the list's order.
    pub items: Vec<T>,
    /// More rows follow the last one.
    pub has_more: bool,
}

impl<T> Page<T> {
    /// The page from `rows`, read with one row more than the page holds (that row, if it
    /// came, says more follow; it is not kept).
    fn cut(mut rows: Vec<T>, req: PageReq) -> Self {
        let n = usize::try_from(req.rows()).unwrap_or(1);
        let has_more = rows.len() > n;
        rows.truncate(n);
        Self {
            items: rows,
            has_more,
        }
    }
}

/// Which accounts a page lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountFilter {
    /// Every human account (system accounts are never listed).
    All,
    /// Accounts in one standing (`Pending`: waiting for a moderator's approval).
    In(Standing),
}

impl AccountFilter {
    /// Accounts waiting for a moderator's approval.
    pub const PENDING: AccountFilter = AccountFilter::In(Standing::Pending);
}

/// Which keys or providers a page lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Live and revoked.
    Any,
    /// Not revoked.
    Live,
    /// Revoked.
    Revoked,
}

impl Liveness {
    fn clause(self, alias: &str) -> String {
        match self {
            Liveness::Any => String::new(),
            Liveness::Live => format!(" AND {alias}.revoked_at IS NULL"),
            Liveness::Revoked => format!(" AND {alias}.revoked_at IS NOT NULL"),
        }
    }
}

fn account_info(r: &AnyRow) -> AccountInfo {
    AccountInfo {
        id: r.get(0),
        name: r.get(1),
        role: Role::parse(r.get::<&str, _>(2)).as_str(),
        status: Standing::parse(r.get::<&str, _>(3)),
        status_reason: r.get(4),
        created_at: r.get(5),
        groups: split_groups(r.get(6)),
    }
}

fn credential(r: &AnyRow) -> CredentialRecord {
    CredentialRecord {
        id: r.get(0),
        name: r.get(1),
        account: r.get(2),
        prefix: r.get(3),
        created_at: r.get(4),
        revoked_at: r.get(5),
    }
}

fn invite(r: &AnyRow) -> InviteInfo {
    InviteInfo {
        id: r.get(0),
        prefix: r.get(1),
        created_by: r.get(2),
        created_at: r.get(3),
        expires_at: r.get(4),
        used_at: r.get(5),
        used_by: r.get(6),
        revoked_at: r.get(7),
    }
}

const KEY_COLUMNS: &str = "SELECT k.id, k.name, a.name, k.prefix, k.created_at, k.revoked_at \
     FROM api_keys k JOIN accounts a ON a.id = k.account_id \
     WHERE a.role NOT IN ('admin', 'system')";

const PROVIDER_COLUMNS: &str = "SELECT p.id, p.name, a.name, p.prefix, p.created_at, p.revoked_at \
     FROM providers p JOIN accounts a ON a.id = p.account_id WHERE 1 = 1";

impl Store {
    fn account_columns(&self) -> String {
        format!(
            "SELECT a.id, a.name, a.role, a.status, a.status_reason, a.created_at, \
             (SELECT {} FROM group_members m JOIN groups g ON g.id = m.group_id \
              WHERE m.account_id = a.id) \
             FROM accounts a WHERE a.role != 'system'",
            self.engine().concat_lines("g.name")
        )
    }

    /// A page of human accounts with their groups, by id ascending.
    pub async fn accounts_page(
        &self,
        filter: AccountFilter,
        req: PageReq,
    ) -> Result<Page<AccountInfo>> {
        let cols = self.account_columns();
        let after = req.after.unwrap_or(i64::MIN);
        let rows = match filter {
            AccountFilter::All => {
                let sql = format!("{cols} AND a.id > $1 ORDER BY a.id LIMIT $2");
                sqlx::query(&sql)
                    .bind(after)
                    .bind(req.rows() + 1)
                    .fetch_all(self.pool())
                    .await?
            }
            AccountFilter::In(standing) => {
                let sql = format!("{cols} AND a.status = $1 AND a.id > $2 ORDER BY a.id LIMIT $3");
                sqlx::query(&sql)
                    .bind(standing.as_str())
                    .bind(after)
                    .bind(req.rows() + 1)
                    .fetch_all(self.pool())
                    .await?
            }
        };
        Ok(Page::cut(rows.iter().map(account_info).collect(), req))
    }

    /// A page of human accounts with their groups, newest first (`after` is the id of the
    /// page before's last, older, account).
    pub async fn newest_accounts(&self, req: PageReq) -> Result<Page<AccountInfo>> {
        let sql = format!(
            "{} AND a.id < $1 ORDER BY a.id DESC LIMIT $2",
            self.account_columns()
        );
        let rows = sqlx::query(&sql)
            .bind(req.after.unwrap_or(i64::MAX))
            .bind(req.rows() + 1)
            .fetch_all(self.pool())
            .await?;
        Ok(Page::cut(rows.iter().map(account_info).collect(), req))
    }

    /// One human account with its groups, by its exact name.
    pub async fn account_info_named(&self, name: &str) -> Result<Option<AccountInfo>> {
        let sql = format!("{} AND a.name = $1", self.account_columns());
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.as_ref().map(account_info))
    }

    /// One human account with its groups, by id.
    pub async fn account_info(&self, id: i64) -> Result<Option<AccountInfo>> {
        let sql = format!("{} AND a.id = $1", self.account_columns());
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.as_ref().map(account_info))
    }

    /// A page of consumer keys (admin keys are never listed), by id ascending.
    pub async fn keys_page(&self, live: Liveness, req: PageReq) -> Result<Page<KeyRecord>> {
        let sql = format!(
            "{KEY_COLUMNS}{} AND k.id > $1 ORDER BY k.id LIMIT $2",
            live.clause("k")
        );
        self.credentials_page(&sql, req).await
    }

    /// A page of providers, by id ascending.
    pub async fn providers_page(
        &self,
        live: Liveness,
        req: PageReq,
    ) -> Result<Page<ProviderRecord>> {
        let sql = format!(
            "{PROVIDER_COLUMNS}{} AND p.id > $1 ORDER BY p.id LIMIT $2",
            live.clause("p")
        );
        self.credentials_page(&sql, req).await
    }

    /// A page of providers, newest first (`after` is the id of the page before's last,
    /// older, provider).
    pub async fn newest_providers(
        &self,
        live: Liveness,
        req: PageReq,
    ) -> Result<Page<ProviderRecord>> {
        let sql = format!(
            "{PROVIDER_COLUMNS}{} AND p.id < $1 ORDER BY p.id DESC LIMIT $2",
            live.clause("p")
        );
        let rows = sqlx::query(&sql)
            .bind(req.after.unwrap_or(i64::MAX))
            .bind(req.rows() + 1)
            .fetch_all(self.pool())
            .await?;
        Ok(Page::cut(rows.iter().map(credential).collect(), req))
    }

    async fn credentials_page(&self, sql: &str, req: PageReq) -> Result<Page<CredentialRecord>> {
        let rows = sqlx::query(sql)
            .bind(req.after.unwrap_or(i64::MIN))
            .bind(req.rows() + 1)
            .fetch_all(self.pool())
            .await?;
        Ok(Page::cut(rows.iter().map(credential).collect(), req))
    }

    /// One provider by id or name. An id wins over a name; among providers of one name
    /// (names are unique among live ones only) the live one, then the newest.
    pub async fn provider_record(
        &self,
        id_or_name: &str,
        live: Liveness,
    ) -> Result<Option<ProviderRecord>> {
        let sql = format!(
            "{PROVIDER_COLUMNS}{} AND (CAST(p.id AS TEXT) = $1 OR p.name = $2) \
             ORDER BY CASE WHEN CAST(p.id AS TEXT) = $3 THEN 0 ELSE 1 END, \
             CASE WHEN p.revoked_at IS NULL THEN 0 ELSE 1 END, p.id DESC LIMIT 1",
            live.clause("p")
        );
        let row = sqlx::query(&sql)
            .bind(id_or_name)
            .bind(id_or_name)
            .bind(id_or_name)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.as_ref().map(credential))
    }

    /// A page of one account's live providers, by id ascending.
    pub async fn providers_of_account(
        &self,
        account_id: i64,
        req: PageReq,
    ) -> Result<Page<ProviderRecord>> {
        let sql = format!(
            "{PROVIDER_COLUMNS} AND p.revoked_at IS NULL AND p.account_id = $1 AND p.id > $2 \
             ORDER BY p.id LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(account_id)
            .bind(req.after.unwrap_or(i64::MIN))
            .bind(req.rows() + 1)
            .fetch_all(self.pool())
            .await?;
        Ok(Page::cut(rows.iter().map(credential).collect(), req))
    }

    /// A page of invites, newest first (`after` is the id of the page before's last,
    /// older, invite).
    pub async fn invites_page(&self, req: PageReq) -> Result<Page<InviteInfo>> {
        let rows = sqlx::query(
            "SELECT i.id, i.prefix, c.name, i.created_at, i.expires_at, i.used_at, u.name, i.revoked_at \
             FROM invites i JOIN accounts c ON c.id = i.created_by LEFT JOIN accounts u ON u.id = i.used_by \
             WHERE i.id < $1 ORDER BY i.id DESC LIMIT $2",
        )
        .bind(req.after.unwrap_or(i64::MAX))
        .bind(req.rows() + 1)
        .fetch_all(self.pool())
        .await?;
        Ok(Page::cut(rows.iter().map(invite).collect(), req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Standing;

    /// Every row of a list, read page by page, each row once and in order.
    async fn walk<T, F, Fut>(limit: i64, mut page: F, id: impl Fn(&T) -> i64) -> Vec<i64>
    where
        F: FnMut(PageReq) -> Fut,
        Fut: std::future::Future<Output = Result<Page<T>>>,
    {
        let mut out = Vec::new();
        let mut req = PageReq::first(limit);
        loop {
            let p = page(req).await.unwrap();
            assert!(p.items.len() as i64 <= limit.max(1));
            out.extend(p.items.iter().map(&id));
            if !p.has_more {
                return out;
            }
            req.after = Some(id(p.items.last().expect("a page with more is not empty")));
        }
    }

    crate::conformance!(lists_are_read_a_page_at_a_time, |db| {
        let s = db.open().await;
        let admin = s
            .create_account("root", Role::Admin, Standing::Active)
            .await
            .unwrap();
        for i in 0..7 {
            let status = if i % 3 == 0 {
                Standing::Pending
            } else {
                Standing::Active
            };
            s.create_account(&format!("m{i}"), Role::Member, status)
                .await
                .unwrap();
            s.create_key(&format!("k{i}"), &format!("m{i}"))
                .await
                .unwrap();
            s.create_provider(&format!("p{i}"), &format!("m{i}"))
                .await
                .unwrap();
            s.create_invite(admin, 3600).await.unwrap();
        }
        s.revoke_key("k1").await.unwrap();
        s.revoke_provider("p2").await.unwrap();

        let all = s
            .accounts_page(AccountFilter::All, PageReq::first(100))
            .await
            .unwrap();
        assert!(!all.has_more);
        let ids: Vec<i64> = all.items.iter().map(|a| a.id).collect();
        for limit in [1, 2, 3, 7, 8] {
            let paged = walk(limit, |r| s.accounts_page(AccountFilter::All, r), |a| a.id).await;
            assert_eq!(paged, ids, "accounts in pages of {limit}");
        }
        let newest_first: Vec<i64> = ids.iter().rev().copied().collect();
        for limit in [1, 3, 8] {
            let newest = walk(limit, |r| s.newest_accounts(r), |a| a.id).await;
            assert_eq!(newest, newest_first, "newest accounts in pages of {limit}");
        }
        let pending = walk(2, |r| s.accounts_page(AccountFilter::PENDING, r), |a| a.id).await;
        assert_eq!(pending.len(), 3, "m0, m3, m6 wait for approval");
        let active = AccountFilter::In(Standing::Active);
        let active = walk(2, |r| s.accounts_page(active, r), |a| a.id).await;
        assert_eq!(active.len(), 5, "root and the four others");

        let keys = walk(3, |r| s.keys_page(Liveness::Any, r), |k| k.id).await;
        assert_eq!(keys.len(), 7, "admin keys are not listed");
        let live = walk(3, |r| s.keys_page(Liveness::Live, r), |k| k.id).await;
        assert_eq!(live.len(), 6);
        let revoked = walk(3, |r| s.keys_page(Liveness::Revoked, r), |k| k.id).await;
        assert_eq!(revoked.len(), 1);
        assert!(keys.windows(2).all(|w| w[0] < w[1]));

        let providers = walk(2, |r| s.providers_page(Liveness::Any, r), |p| p.id).await;
        assert_eq!(providers.len(), 7);
        let live = walk(2, |r| s.providers_page(Liveness::Live, r), |p| p.id).await;
        assert_eq!(live.len(), 6);
        let newest = walk(2, |r| s.newest_providers(Liveness::Live, r), |p| p.id).await;
        assert_eq!(newest, live.iter().rev().copied().collect::<Vec<_>>());

        let invites = walk(4, |r| s.invites_page(r), |i| i.id).await;
        assert_eq!(invites.len(), 7);
        assert!(invites.windows(2).all(|w| w[0] > w[1]), "newest first");

        // A limit out of range is clamped, never an error or a whole table.
        let one = s
            .accounts_page(AccountFilter::All, PageReq::first(0))
            .await
            .unwrap();
        assert_eq!((one.items.len(), one.has_more), (1, true));
        let far = PageReq {
            after: Some(i64::MAX),
            limit: i64::MAX,
        };
        assert!(s
            .accounts_page(AccountFilter::All, far)
            .await
            .unwrap()
            .items
            .is_empty());
    });

    crate::conformance!(one_row_is_read_alone, |db| {
        let s = db.open().await;
        let a = s
            .create_account("ann", Role::Member, Standing::Active)
            .await
            .unwrap();
        s.create_account("bo", Role::Member, Standing::Active)
            .await
            .unwrap();
        let (old, _) = s.create_provider("box", "ann").await.unwrap();
        s.revoke_provider(&old.to_string()).await.unwrap();
        let (new, _) = s.create_provider("box", "ann").await.unwrap();
        s.create_provider("other", "bo").await.unwrap();

        let info = s.account_info(a).await.unwrap().expect("ann");
        assert_eq!(info.name, "ann");
        let named = s.account_info_named("ann").await.unwrap().expect("ann");
        assert_eq!(named.id, a);
        assert!(
            s.account_info_named("an").await.unwrap().is_none(),
            "exact names only"
        );
        assert!(s.account_info(a + 1000).await.unwrap().is_none());

        let by_name = s
            .provider_record("box", Liveness::Any)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(by_name.id, new, "a name finds the live provider first");
        let by_id = s
            .provider_record(&old.to_string(), Liveness::Any)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((by_id.id, by_id.revoked_at.is_some()), (old, true));
        assert!(s
            .provider_record(&old.to_string(), Liveness::Live)
            .await
            .unwrap()
            .is_none());

        // A provider named after another's id: the id wins, whichever row the database
        // happens to read first. Both orders: the namesake made after the provider it
        // names, and before it (named after the id the next provider will get).
        let (first, _) = s.create_provider("first", "bo").await.unwrap();
        let (namesake, _) = s.create_provider(&first.to_string(), "bo").await.unwrap();
        let next = namesake + 2;
        let (early, _) = s.create_provider(&next.to_string(), "bo").await.unwrap();
        let (later, _) = s.create_provider("later", "bo").await.unwrap();
        assert_eq!((early, later), (namesake + 1, next), "ids in order");
        for target in [first, later] {
            let id = target.to_string();
            assert_eq!(s.provider_id(&id).await.unwrap(), target);
            let by_id = s.provider_record(&id, Liveness::Live).await.unwrap();
            assert_eq!(by_id.unwrap().id, target);
        }

        let mine = s.providers_of_account(a, PageReq::first(10)).await.unwrap();
        assert_eq!(
            mine.items.iter().map(|p| p.id).collect::<Vec<_>>(),
            vec![new],
            "live providers of this account only"
        );
    });
}
