//! The one place kiln talks to burn-collective: register a worker, all-reduce one
//! flat vector per optimizer step, leave.
//!
//! Every exchange is a single all-reduce (sum) of one 1-D tensor: all gradients (or
//! parameters) flattened in the model's visiting order, followed by a few status
//! numbers (the step's weighted loss, "stop", "failed"). One exchange per step is
//! burn-collective 0.21's verified pattern (memo §4.3: repeated global all-reduces
//! on one registration hang across nodes), it keeps the message count independent of
//! the model, and it lets every worker learn in the same exchange whether another
//! one failed or was asked to stop, so that no worker ever waits for one that left.
//!
//! In-process workers on one machine use burn-collective's local server, which works
//! on every Burn backend (CPU included). This module is what the multi-node engine
//! will extend with burn-collective's global configuration.

use std::marker::PhantomData;

use burn::collective::{
    CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, register,
};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{FloatDType, TensorPrimitive};

use crate::CoordinatorError;

/// Status numbers sent with each step's gradients.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Status {
    /// The worker's loss, weighted by its share of the global batch (summed: the
    /// global batch's mean loss).
    pub loss: f64,
    /// 1 when the worker was asked to stop.
    pub stop: f64,
    /// 1 when the worker failed.
    pub failed: f64,
    /// 1 when rank 0's time-based checkpoint interval has elapsed.
    pub save_due: f64,
}

const STATUS_LEN: usize = 4;

impl Status {
    fn to_vec(self) -> [f32; STATUS_LEN] {
        [
            self.loss as f32,
            self.stop as f32,
            self.failed as f32,
            self.save_due as f32,
        ]
    }

    fn from_slice(v: &[f32]) -> Self {
        Self {
            loss: v[0] as f64,
            stop: v[1] as f64,
            failed: v[2] as f64,
            save_due: v[3] as f64,
        }
    }
}

/// One registered worker of a data-parallel group.
pub(crate) struct Peer<B: AutodiffBackend> {
    id: PeerId,
    world: usize,
    device: B::Device,
    backend: PhantomData<B>,
}

impl<B: AutodiffBackend> Peer<B> {
    /// Registers worker `rank` of `world` on `device`; returns once every worker of
    /// the group has registered.
    pub fn register(
        rank: usize,
        world: usize,
        device: &B::Device,
    ) -> Result<Self, CoordinatorError> {
        let id = PeerId::from(rank as u32);
        let config = CollectiveConfig::default().with_num_devices(world);
        register::<B::InnerBackend>(id, device.clone(), config)
            .map_err(|e| collective_error("register", rank, e))?;
        Ok(Self {
            id,
            world,
            device: device.clone(),
            backend: PhantomData,
        })
    }

    /// Leaves the group.
    pub fn finish(self) -> Result<(), CoordinatorError> {
        finish_collective::<B::InnerBackend>(self.id)
            .map_err(|e| collective_error("finish", self.id.0 as usize, e))
    }

    /// Sums `grads` (zeros for a worker that has none) and `status` over the group.
    pub fn sum_step<M: AutodiffModule<B>>(
        &self,
        model: &M,
        grads: Option<&GradientsParams>,
        status: Status,
    ) -> Result<(GradientsParams, Status), CoordinatorError> {
        let mut flatten = Flatten::<B> {
            parts: Vec::new(),
            source: Source::Grads(grads),
        };
        model.visit(&mut flatten);
        let (flat, n) = self.sum(flatten.parts, status)?;
        let mut unflatten = Unflatten::<B> {
            flat: &flat,
            offset: 0,
            grads: GradientsParams::new(),
        };
        model.visit(&mut unflatten);
        let grads = unflatten.grads;
        let status = Status::from_slice(
            &flat
                .narrow(0, n, STATUS_LEN)
                .into_data()
                .to_vec::<f32>()
                .map_err(|e| {
                    CoordinatorError::Collective(format!("cannot read the status numbers: {e:?}"))
                })?,
        );
        Ok((grads, status))
    }

    /// Sums the parameters `owned` selects (zeros elsewhere) over the group and puts
    /// the sums into `model`: each parameter ends up with its owner's value.
    pub fn gather_params<M: AutodiffModule<B>>(
        &self,
        model: M,
        owned: &dyn Fn(usize) -> bool,
    ) -> Result<M, CoordinatorError> {
        let mut flatten = Flatten::<B> {
            parts: Vec::new(),
            source: Source::Params(owned, 0),
        };
        model.visit(&mut flatten);
        let (flat, _) = self.sum(flatten.parts, Status::default())?;
        Ok(model.map(&mut Replace::<B> {
            flat: &flat,
            offset: 0,
        }))
    }

    /// The largest difference between this worker's parameters and their mean over
    /// the group, and the largest parameter magnitude: the first is zero (to float
    /// rounding) when every replica holds the same weights.
    pub fn replica_spread<M: AutodiffModule<B>>(
        &self,
        model: &M,
    ) -> Result<(f64, f64), CoordinatorError> {
        let mut flatten = Flatten::<B> {
            parts: Vec::new(),
            source: Source::Params(&|_| true, 0),
        };
        model.visit(&mut flatten);
        let mine = Tensor::cat(flatten.parts.clone(), 0);
        let (sum, n) = self.sum(flatten.parts, Status::default())?;
        let mean = sum.narrow(0, 0, n).div_scalar(self.world as f64);
        let scale = mine.clone().abs().max().into_scalar().elem::<f64>();
        let spread = (mean - mine).abs().max().into_scalar().elem::<f64>();
        Ok((spread, scale))
    }

    /// All-reduces `parts` followed by `status`; returns the sum and the length of
    /// the parts.
    fn sum(
        &self,
        parts: Vec<Tensor<B::InnerBackend, 1>>,
        status: Status,
    ) -> Result<(Tensor<B::InnerBackend, 1>, usize), CoordinatorError> {
        let n: usize = parts.iter().map(|t| t.dims()[0]).sum();
        let mut parts = parts;
        parts.push(Tensor::from_floats(status.to_vec(), &self.device));
        let flat = Tensor::cat(parts, 0);
        let primitive = match flat.into_primitive() {
            TensorPrimitive::Float(p) => p,
            TensorPrimitive::QFloat(_) => {
                return Err(CoordinatorError::Collective(
                    "quantized tensors cannot be all-reduced".into(),
                ));
            }
        };
        let summed = all_reduce::<B::InnerBackend>(self.id, primitive, ReduceOperation::Sum)
            .map_err(|e| collective_error("all-reduce", self.id.0 as usize, e))?;
        Ok((Tensor::from_primitive(TensorPrimitive::Float(summed)), n))
    }
}

fn collective_error(what: &str, rank: usize, e: impl std::fmt::Debug) -> CoordinatorError {
    CoordinatorError::Collective(format!("{what} failed on worker {rank}: {e:?}"))
}

enum Source<'a> {
    /// The gradients (zeros where missing or when there are none).
    Grads(Option<&'a GradientsParams>),
    /// The parameter values the predicate selects by visiting index (zeros
    /// elsewhere), and the next index.
    Params(&'a dyn Fn(usize) -> bool, usize),
}

struct Flatten<'a, B: AutodiffBackend> {
    parts: Vec<Tensor<B::InnerBackend, 1>>,
    source: Source<'a>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val().inner();
        let n = value.shape().num_elements();
        let device = value.device();
        let part = match &mut self.source {
            Source::Grads(grads) => grads
                .and_then(|g| g.get::<B::InnerBackend, D>(param.id))
                .map(|g| g.reshape([n]))
                .unwrap_or_else(|| Tensor::zeros([n], &device)),
            Source::Params(owned, index) => {
                let mine = owned(*index);
                *index += 1;
                match mine {
                    true => value.reshape([n]),
                    false => Tensor::zeros([n], &device),
                }
            }
        };
        // Exchanged in f32 (the status numbers are f32; bf16-true and 16-true
        // parameters and gradients are cast back on arrival).
        self.parts.push(part.cast(FloatDType::F32));
    }
}

struct Unflatten<'a, B: AutodiffBackend> {
    flat: &'a Tensor<B::InnerBackend, 1>,
    offset: usize,
    grads: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let shape = value.shape();
        let n = shape.num_elements();
        let part = self.flat.clone().narrow(0, self.offset, n).reshape(shape);
        self.offset += n;
        self.grads
            .register::<B::InnerBackend, D>(param.id, part.cast(value.dtype()));
    }
}

struct Replace<'a, B: AutodiffBackend> {
    flat: &'a Tensor<B::InnerBackend, 1>,
    offset: usize,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Replace<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let n = shape.num_elements();
        let part = self.flat.clone().narrow(0, self.offset, n).reshape(shape);
        self.offset += n;
        let mut value = Tensor::<B, D>::from_inner(part.cast(tensor.dtype()));
        if tensor.is_require_grad() {
            value = value.require_grad();
        }
        Param::from_mapped_value(id, value, mapper)
    }
}
