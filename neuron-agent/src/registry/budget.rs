//! The memory budget (docs/protocol.md §6): what each model takes, what the
//! node may give, and the check that refuses a load that cannot fit before
//! its engine is started.
//!
//! A model takes its estimate from its files while loading, then the
//! engine's real weight figure plus its KV cache once loaded; unloading
//! models still count until their engine is gone.

use super::{LifecycleError, Phase, Registry, Slot};
use helexa_protocol::MemoryBudget;

impl Registry {
    pub(crate) fn estimate_of(&self, i: usize) -> crate::memory::Estimate {
        *self.inner.estimates[i].lock().expect("estimate lock")
    }

    /// A `repo` model's files arrived: its estimate from them, then the
    /// budget check a local model had before its load began (the load
    /// fails with `insufficient_memory` when they do not fit).
    pub(crate) fn check_fetched(
        &self,
        i: usize,
        estimate: crate::memory::Estimate,
    ) -> Result<(), LifecycleError> {
        let _admit = self.inner.admit.lock().expect("admit lock");
        *self.inner.estimates[i].lock().expect("estimate lock") = estimate;
        self.check_fits(i)
    }

    /// What `slot` takes now, MiB (0 when unloaded, or unknown).
    fn taken_mb(&self, i: usize, slot: &Slot) -> u64 {
        let st = slot.lock();
        match st.phase {
            Phase::Unloaded | Phase::Failed => 0,
            Phase::Loading | Phase::Loaded | Phase::Recovering | Phase::Unloading => {
                let engine = st
                    .engine
                    .as_ref()
                    .map(|e| e.info.weights_bytes)
                    .or(st.last_info.as_ref().map(|i| i.weights_bytes))
                    .unwrap_or(0);
                self.estimate_of(i).loaded_mb(engine)
            }
        }
    }

    /// `/health` `memory_mb`.
    pub fn memory(&self) -> MemoryBudget {
        let used = self
            .inner
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| self.taken_mb(i, s))
            .sum();
        MemoryBudget::new(self.inner.budget_mb, used)
    }

    /// The catalogue figure of `id` (`/discovery`): what it takes while
    /// loaded, its estimate otherwise; 0 = unknown.
    pub fn memory_mb(&self, id: &str) -> u64 {
        let Some(&i) = self.inner.by_id.get(id) else {
            return 0;
        };
        match self.taken_mb(i, &self.inner.slots[i]) {
            0 => self.estimate_of(i).total_mb(),
            n => n,
        }
    }

    /// Refuses loading slot `i` when its estimate does not fit beside what
    /// the other models take. Called with `Inner::admit` held, so that two
    /// loads cannot both take the last free memory.
    pub(super) fn check_fits(&self, i: usize) -> Result<(), LifecycleError> {
        let need = self.estimate_of(i).total_mb();
        if need == 0 {
            // Unknown (files not fetched yet): nothing to check against.
            return Ok(());
        }
        let used: u64 = self
            .inner
            .slots
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, s)| self.taken_mb(j, s))
            .sum();
        let budget = self.inner.budget_mb;
        let free = budget.saturating_sub(used);
        if need > free {
            return Err(LifecycleError::InsufficientMemory {
                id: self.inner.slots[i].spec.id.clone(),
                need,
                free,
                budget,
            });
        }
        Ok(())
    }
}
