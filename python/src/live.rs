//! A buffer shared between Python threads: a lock around `Option<T>` (`None` once destroyed).

use crate::errors::destroyed;
use pyo3::PyResult;
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

/// Locks `m`, whatever a panicking holder left (the buffers' state is checked by the library
/// itself on every call).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A locked buffer that has not been destroyed.
pub(crate) struct Live<'a, T>(MutexGuard<'a, Option<T>>);

impl<'a, T> Live<'a, T> {
    /// Locks `m`; the error of a destroyed buffer when it holds `None`.
    pub(crate) fn of(m: &'a Mutex<Option<T>>) -> PyResult<Self> {
        let g = lock(m);
        if g.is_none() {
            return Err(destroyed());
        }
        Ok(Live(g))
    }
}

impl<T> Deref for Live<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // Checked in `of`, and nothing takes the value while the guard is held.
        self.0.as_ref().expect("checked when locked")
    }
}

impl<T> DerefMut for Live<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.as_mut().expect("checked when locked")
    }
}
