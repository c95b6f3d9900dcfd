//! [`Member`]: one worker's place in the Learner engine's data-parallel group, as
//! its [`Stepper`](super::stepper::Stepper) reaches it through the worker's
//! [`Shared`] state: the step's exchange, fsdp's gather of the parameters and of
//! the optimizer's shards for a checkpoint, and the replica check (the rules of
//! `crate::group`, the native loop's too).

use std::sync::{Arc, OnceLock};

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, SimpleOptimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::shared::Shared;
use crate::CoordinatorError;
use crate::checkpoint::{decode_record, encode_record};
use crate::collective::Peer;
use crate::group::{Group, Offer, check_replicas, exchange_step, gather_shards};
use crate::optim::OptimRecord;
use crate::run::Failure;

/// One worker's place in the group, reached by its stepper through its
/// [`Shared`] state.
pub(crate) struct Member<B: AutodiffBackend, M> {
    pub rank: usize,
    pub world: usize,
    /// fsdp: this worker keeps the optimizer state of, and updates, only its share
    /// of the parameters.
    pub sharded: bool,
    pub device: B::Device,
    /// The group's first failure, and fsdp's encoded optimizer shards.
    pub group: Arc<Group<Vec<u8>>>,
    /// Registered on the worker's own thread when it starts.
    pub peer: OnceLock<Peer<B>>,
    /// fsdp checkpoints: merges encoded optimizer shards into one record
    /// ([`merge_shards`] for the run's optimizer).
    pub merge: MergeShards<B>,
    pub marker: std::marker::PhantomData<fn() -> M>,
}

/// Merges rank 0's encoded optimizer shard with the others' into one encoded
/// record.
pub(crate) type MergeShards<B> =
    fn(Vec<u8>, Vec<Vec<u8>>, &burn::tensor::Device<B>) -> Result<Vec<u8>, CoordinatorError>;

/// [`MergeShards`] for optimizer `S` and model `M`.
pub(crate) fn merge_shards<B, M, S>(
    mine: Vec<u8>,
    others: Vec<Vec<u8>>,
    device: &B::Device,
) -> Result<Vec<u8>, CoordinatorError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    S: SimpleOptimizer<B::InnerBackend>,
{
    let mut whole: OptimRecord<S, B, M> = decode_record::<B, _>(mine, device)?;
    for shard in others {
        let shard: OptimRecord<S, B, M> = decode_record::<B, _>(shard, device)?;
        whole.extend(shard);
    }
    encode_record::<B, _>(whole)
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> Member<B, M> {
    /// Whether this worker owns the parameter at `index` (visiting order).
    pub fn owns(&self, index: usize) -> bool {
        crate::group::owns(self.sharded, self.rank, self.world, index)
    }

    /// This worker's registration with the group (made on its own thread when it
    /// starts).
    pub fn peer(&self) -> Result<&Peer<B>, Failure> {
        self.peer.get().ok_or_else(|| {
            Failure::Error(CoordinatorError::Collective(format!(
                "worker {} trained before joining its group",
                self.rank
            )))
        })
    }

    /// Sums one step over the group: the summed gradients, the step's loss and
    /// whether rank 0's clock asks for a checkpoint. Under the backend's
    /// synchronisation (`Settings::backend_sync`) `grads` already are the group's
    /// sums and only the status numbers are exchanged.
    pub fn exchange(
        &self,
        shared: &Shared,
        model: &M,
        grads: Option<GradientsParams>,
        loss: f64,
        time_due: bool,
        step: u64,
    ) -> Result<(GradientsParams, f64, bool), Failure> {
        // A stop reaches a worker through its loader, which checks it once a batch
        // is built (as the native loop does), or through burn-train's interrupter
        // (its dashboard). The stop handle itself is not read here: the next batch
        // may be built ahead, during this step, and the step is taken all the same.
        let own = shared.position().failure.take();
        let stopped = matches!(own, Some(Failure::Stopped)) || shared.interrupter.should_stop();
        let synced = shared.settings.backend_sync;
        let offer = Offer {
            grads: grads.as_ref().filter(|_| !synced),
            loss,
            stopped,
            failure: own.filter(|f| !matches!(f, Failure::Stopped)),
            time_due,
            status_only: synced,
        };
        let started = std::time::Instant::now();
        let peer = self.peer()?;
        let outcome = exchange_step(
            peer,
            &self.group,
            self.rank,
            model,
            offer,
            &shared.stop,
            &format!("step {step}"),
        );
        shared.position().collective_seconds += started.elapsed().as_secs_f64();
        let (summed, all) = outcome?;
        let summed = match synced {
            true => grads.unwrap_or_default(),
            false => summed,
        };
        Ok((summed, all.loss, all.save_due > 0.0))
    }

    /// fsdp: every worker's parameters updated by their owners.
    pub fn gather(&self, shared: &Shared, model: M) -> Result<M, Failure> {
        let started = std::time::Instant::now();
        let gathered = self
            .peer()?
            .gather_params(model, &|i| self.owns(i))
            .map_err(|e| self.group.explain(&shared.stop, e));
        shared.position().collective_seconds += started.elapsed().as_secs_f64();
        gathered
    }

    /// With `check_replicas`: compares this worker's weights with the group's after
    /// step `step`; a difference is this worker's failure, told at the next exchange.
    pub fn check(&self, shared: &Shared, model: &M, step: u64) {
        let checked = self.peer().and_then(|peer| {
            check_replicas(
                peer,
                &self.group,
                model,
                None,
                &shared.stop,
                &format!("step {step}"),
            )
        });
        match checked {
            Ok((spread, _)) => {
                let mut p = shared.position();
                p.replica_spread = Some(p.replica_spread.unwrap_or(0.0).max(spread));
            }
            Err(failure) => shared.fail(failure),
        }
    }

    /// fsdp checkpoints: rank 0 gets the whole optimizer record, encoded (its own
    /// shard and every other worker's); the others hand theirs over and get `None`.
    pub fn whole_record<BR: Backend, R: burn::record::Record<BR>>(
        &self,
        record: R,
    ) -> Option<Result<Vec<u8>, CoordinatorError>> {
        let (mine, error) = match encode_record::<BR, R>(record) {
            Ok(bytes) => (bytes, None),
            // Handed over all the same (empty), so that rank 0 does not wait for it.
            Err(e) => (Vec::new(), Some(e)),
        };
        let gathered = gather_shards(Some(&*self.group), self.rank, true, self.world, mine);
        if let Some(e) = error {
            return Some(Err(e));
        }
        match gathered {
            Ok(Some((mine, others))) => Some((self.merge)(mine, others, &self.device)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}
