//! The route table of a single-process deployment: in memory, because a
//! route only lives as long as its connection, and every connection of an
//! all-in-one process dies with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::{ConnRef, Result, RouteTable};

#[derive(Default)]
struct Routes {
    /// A user's connections, shared with every push that reads them (rebuilt on a change,
    /// which is rare next to reads).
    by_user: HashMap<String, Arc<[ConnRef]>>,
    by_conn: HashMap<(String, u64), String>,
}

/// In-process [`RouteTable`].
#[derive(Default)]
pub struct MemoryRoutes {
    inner: Mutex<Routes>,
}

impl MemoryRoutes {
    fn with<T>(&self, f: impl FnOnce(&mut Routes) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-update of a
        // map that stays structurally valid; keep serving.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

fn drop_conn(r: &mut Routes, user: &str, gateway: &str, conn_id: u64) {
    if let Some(list) = r.by_user.get_mut(user) {
        let kept: Vec<ConnRef> =
            list.iter().filter(|c| !(c.gateway == gateway && c.conn_id == conn_id)).cloned().collect();
        if kept.is_empty() {
            r.by_user.remove(user);
        } else if kept.len() < list.len() {
            *list = kept.into();
        }
    }
    r.by_conn.remove(&(gateway.to_owned(), conn_id));
}

#[async_trait]
impl RouteTable for MemoryRoutes {
    async fn add(&self, user: &str, conn: ConnRef) -> Result<()> {
        self.with(|r| {
            r.by_conn.insert((conn.gateway.clone(), conn.conn_id), user.to_owned());
            let list = r.by_user.entry(user.to_owned()).or_insert_with(|| Arc::new([]));
            if !list.contains(&conn) {
                *list = list.iter().cloned().chain([conn]).collect();
            }
        });
        Ok(())
    }

    async fn remove(&self, user: &str, conn: &ConnRef) -> Result<()> {
        self.with(|r| drop_conn(r, user, &conn.gateway, conn.conn_id));
        Ok(())
    }

    async fn get(&self, user: &str) -> Result<Vec<ConnRef>> {
        Ok(self.with(|r| r.by_user.get(user).map(|l| l.to_vec()).unwrap_or_default()))
    }

    async fn get_many(&self, users: &[String]) -> Result<Vec<Arc<[ConnRef]>>> {
        Ok(self.with(|r| users.iter().map(|u| r.by_user.get(u).cloned().unwrap_or_else(|| Arc::new([]))).collect()))
    }

    async fn remove_conn(&self, gateway: &str, conn_id: u64) -> Result<()> {
        self.with(|r| {
            if let Some(user) = r.by_conn.get(&(gateway.to_owned(), conn_id)).cloned() {
                drop_conn(r, &user, gateway, conn_id);
            }
        });
        Ok(())
    }
}
