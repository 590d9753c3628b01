//! The staff page's sections and the pages they are read in: each list is one page of
//! `web.page_rows` rows, with a link to the next page (its last row's id in the query,
//! one cursor a list) and back to the first.

use potluck_store::listing::{Page, PageReq};

use crate::http::error::ApiError;

/// One row's cells, as shown.
pub(crate) struct Row(pub(super) Vec<String>);

/// A row from its cells.
pub(super) fn cells(v: impl IntoIterator<Item = String>) -> Row {
    Row(v.into_iter().collect())
}

/// A section: a title, column names, rows, the action each row's form posts, and where
/// its list goes on.
pub(crate) struct Section {
    pub(super) id: &'static str,
    pub(super) title: &'static str,
    pub(super) columns: &'static [&'static str],
    pub(super) rows: Vec<(Row, Option<String>)>,
    /// The button of each row's form; empty: the rows have no form.
    pub(super) action: &'static str,
    /// The choices of the row's form (`action`), if it has any.
    pub(super) choices: &'static [&'static str],
    /// Whether the row's form asks for a reason.
    pub(super) reason: bool,
    /// The row's form's text fields (their names), if it has any.
    pub(super) fields: &'static [&'static str],
    pub(super) paging: Paging,
    /// A line under the title saying how to read the section; empty: none.
    pub(super) hint: &'static str,
}

impl Section {
    /// A section of `rows` without forms, on one page (set the other fields with
    /// `Section { .., ..Section::new(..) }`).
    pub(super) fn new(
        id: &'static str,
        title: &'static str,
        columns: &'static [&'static str],
        rows: Vec<(Row, Option<String>)>,
    ) -> Self {
        Self {
            id,
            title,
            columns,
            rows,
            action: "",
            choices: &[],
            reason: false,
            fields: &[],
            paging: Paging::default(),
            hint: "",
        }
    }
}

/// A section's links to the next page of its list and back to the first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Paging {
    /// The next page's address, when more rows follow.
    pub(super) next: Option<String>,
    /// Whether this is a later page than the first (a link back is shown).
    pub(super) later: bool,
}

/// One page of a list the staff page shows, and where the next one starts.
pub(super) struct Listed<T> {
    pub(super) items: Vec<T>,
    /// The query parameter that carries this list's cursor.
    param: &'static str,
    /// The last row's id, when more rows follow.
    next: Option<i64>,
    later: bool,
}

impl<T> Listed<T> {
    /// The page read for `req`; `id` gives a row's id (the cursor).
    pub(super) fn of(
        page: Page<T>,
        req: PageReq,
        param: &'static str,
        id: impl Fn(&T) -> i64,
    ) -> Self {
        let next = page.has_more.then(|| page.items.last().map(id)).flatten();
        Self {
            items: page.items,
            param,
            next,
            later: req.after.is_some(),
        }
    }

    /// Rows that are the whole answer (an account found by name): no other page.
    pub(super) fn whole(items: Vec<T>) -> Self {
        Self {
            items,
            param: "",
            next: None,
            later: false,
        }
    }

    /// The links of a section with HTML id `section` that shows this list.
    pub(super) fn paging(&self, section: &str) -> Paging {
        Paging {
            next: self
                .next
                .map(|after| format!("/web/staff?{}={after}#{section}", self.param)),
            later: self.later,
        }
    }
}

/// The staff page's query as it came: `account` finds one account by its exact name;
/// each `*_after` is where a list's page starts (the id of the previous page's last row),
/// read by [`StaffQuery::cursors`].
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct StaffQuery {
    pub(super) account: Option<String>,
    pending_after: Option<String>,
    accounts_after: Option<String>,
    invites_after: Option<String>,
    keys_after: Option<String>,
    revoked_after: Option<String>,
    providers_after: Option<String>,
}

/// Where each list's page starts; `None`: its first page.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Cursors {
    pub(super) pending: Option<i64>,
    pub(super) accounts: Option<i64>,
    pub(super) invites: Option<i64>,
    pub(super) keys: Option<i64>,
    pub(super) revoked: Option<i64>,
    pub(super) providers: Option<i64>,
}

impl StaffQuery {
    /// Each list's cursor; a cursor that is not a whole number is a bad request naming
    /// it, not the first page shown as if it had been asked for.
    pub(super) fn cursors(&self) -> Result<Cursors, ApiError> {
        Ok(Cursors {
            pending: cursor(&self.pending_after, "pending_after")?,
            accounts: cursor(&self.accounts_after, "accounts_after")?,
            invites: cursor(&self.invites_after, "invites_after")?,
            keys: cursor(&self.keys_after, "keys_after")?,
            revoked: cursor(&self.revoked_after, "revoked_after")?,
            providers: cursor(&self.providers_after, "providers_after")?,
        })
    }
}

fn cursor(v: &Option<String>, name: &'static str) -> Result<Option<i64>, ApiError> {
    v.as_deref()
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::bad_request(format!("'{name}' must be a whole number."), Some(name))
            })
        })
        .transpose()
}
