//! Which hubs are alive on a shared database: each hub renews its own row every few
//! seconds, and counts the rows renewed within a time to live (by the database's clock).
//! Hubs split per-account limits evenly by that count.

use crate::store::Result;
use crate::Store;

impl Store {
    /// Say that `hub` is alive, forget hubs not seen for `ttl_ms`, and count the live
    /// ones (this one included, so at least 1).
    pub async fn heartbeat(&self, hub: &str, ttl_ms: i64) -> Result<u64> {
        let now = self.engine().now_ms();
        let mut tx = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO hub_presence (hub, seen_at_ms) VALUES ($1, {now}) \
             ON CONFLICT (hub) DO UPDATE SET seen_at_ms = excluded.seen_at_ms"
        ))
        .bind(hub)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM hub_presence WHERE seen_at_ms < {now} - $1"
        ))
        .bind(ttl_ms)
        .execute(&mut *tx)
        .await?;
        let live: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM hub_presence")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(u64::try_from(live).unwrap_or(0).max(1))
    }

    /// `hub` is stopping: the others stop counting it at once.
    pub async fn leave(&self, hub: &str) -> Result<()> {
        sqlx::query("DELETE FROM hub_presence WHERE hub = $1")
            .bind(hub)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    crate::conformance!(live_hubs_are_counted_and_dead_ones_forgotten, |db| {
        let store = db.open().await;
        assert_eq!(store.heartbeat("a", 60_000).await.unwrap(), 1);
        assert_eq!(store.heartbeat("b", 60_000).await.unwrap(), 2);
        assert_eq!(
            store.heartbeat("a", 60_000).await.unwrap(),
            2,
            "renewed, not added"
        );
        store.leave("b").await.unwrap();
        assert_eq!(store.heartbeat("a", 60_000).await.unwrap(), 1);
        assert_eq!(store.heartbeat("c", 60_000).await.unwrap(), 2);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // "c" was not seen for 20 ms: with a 10 ms time to live it is gone.
        assert_eq!(store.heartbeat("a", 10).await.unwrap(), 1);
    });
}
