//! `VixDiskLib_PrepareForAccess` / `VixDiskLib_EndAccess` as a guard.

use std::fmt;

use crate::Result;

type EndAccessFn = Box<dyn FnOnce(&str) -> Result<()> + Send>;

/// Proof that `PrepareForAccess` succeeded; dropping it calls `EndAccess` with the same
/// parameters and identity — also when the code holding it panics, so a crashed backup does
/// not leave Storage vMotion disabled on the VM.
///
/// Drop the guard (or call [`end`](AccessGuard::end) to see EndAccess's error) after closing
/// every disk and deleting the snapshot, as the VDDK guide asks.
#[must_use = "dropping the guard at once calls EndAccess at once"]
pub struct AccessGuard {
    identity: String,
    end: Option<EndAccessFn>,
}

impl AccessGuard {
    /// A guard that runs `end_access(identity)` once, when ended or dropped. Backends call
    /// this after their PrepareForAccess succeeded.
    pub fn new(
        identity: impl Into<String>,
        end_access: impl FnOnce(&str) -> Result<()> + Send + 'static,
    ) -> Self {
        AccessGuard {
            identity: identity.into(),
            end: Some(Box::new(end_access)),
        }
    }

    /// The identity passed to PrepareForAccess (the VM or application name).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Calls EndAccess now and returns its result.
    pub fn end(mut self) -> Result<()> {
        match self.end.take() {
            Some(end) => end(&self.identity),
            None => Ok(()),
        }
    }
}

impl Drop for AccessGuard {
    fn drop(&mut self) {
        if let Some(end) = self.end.take() {
            // Errors cannot be returned from drop; callers who care use `end()`. EndAccess can
            // also be called later on its own "to clean up after a crash".
            let _ = end(&self.identity);
        }
    }
}

impl fmt::Debug for AccessGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessGuard")
            .field("identity", &self.identity)
            .field("ended", &self.end.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn end_runs_once_on_drop_and_on_panic() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        drop(AccessGuard::new("vm1", move |id| {
            assert_eq!(id, "vm1");
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let c = calls.clone();
        let result = std::panic::catch_unwind(move || {
            let _guard = AccessGuard::new("vm2", move |_| {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(())
            });
            panic!("backup failed");
        });
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let c = calls.clone();
        let guard = AccessGuard::new("vm3", move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            Err(crate::Error::Unsupported("EndAccess".into()))
        });
        assert!(guard.end().is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
