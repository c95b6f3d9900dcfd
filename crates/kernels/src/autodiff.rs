//! [`FusedOps`] for `Autodiff<B>`: each fused operation is one node of the graph, its
//! forward pass `B`'s fused op, its backward pass `B`'s fused backward.
//!
//! The nodes are compute-bound and keep in their state what the backward pass reads
//! (the input, or the output for the softmax), so no checkpointing strategy ever
//! recomputes them.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::grads::{AttentionGrads, LayerNormGrads, LinearGrads};
use crate::ops::FusedOps;

#[derive(Debug)]
struct Gelu;

impl<B: FusedOps> Backward<B, 1> for Gelu {
    /// What [`FusedOps::fused_gelu_saving`] kept (the input, or its derivative).
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let saved = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::fused_gelu_backward_saved(saved, grad)
        });
    }
}

#[derive(Debug)]
struct Softmax;

impl<B: FusedOps> Backward<B, 1> for Softmax {
    /// The output and the dimension.
    type State = (FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (y, dim) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::fused_softmax_backward(y, grad, dim)
        });
    }
}

#[derive(Debug)]
struct CrossEntropy;

impl<B: FusedOps> Backward<B, 1> for CrossEntropy {
    /// The logits and the class ids.
    type State = (FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::fused_cross_entropy_backward(logits, targets, grad)
        });
    }
}

#[derive(Debug)]
struct LayerNorm;

impl<B: FusedOps> Backward<B, 3> for LayerNorm {
    /// The input, γ and ε.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_parent, gamma_parent, beta_parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if x_parent.is_none() && gamma_parent.is_none() && beta_parent.is_none() {
            return;
        }
        let (x, gamma, epsilon) = ops.state;
        let LayerNormGrads {
            x: dx,
            gamma: dgamma,
            beta: dbeta,
        } = B::fused_layer_norm_backward(x, gamma, grad, epsilon);
        for (parent, value) in [(x_parent, dx), (gamma_parent, dgamma), (beta_parent, dbeta)] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, value);
            }
        }
    }
}

#[derive(Debug)]
struct Linear;

impl<B: FusedOps> Backward<B, 3> for Linear {
    /// The input and the weight.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_parent, weight_parent, bias_parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if x_parent.is_none() && weight_parent.is_none() && bias_parent.is_none() {
            return;
        }
        let (x, weight) = ops.state;
        let LinearGrads {
            x: dx,
            weight: dweight,
            bias: dbias,
        } = B::fused_linear_backward(x, weight, grad);
        for (parent, value) in [
            (x_parent, dx),
            (weight_parent, dweight),
            (bias_parent, dbias),
        ] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, value);
            }
        }
    }
}

#[derive(Debug)]
struct CausalAttention;

impl<B: FusedOps> Backward<B, 3> for CausalAttention {
    /// Queries, keys, values and the number of heads.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_parent, k_parent, v_parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if q_parent.is_none() && k_parent.is_none() && v_parent.is_none() {
            return;
        }
        let (q, k, v, heads) = ops.state;
        let AttentionGrads {
            q: dq,
            k: dk,
            v: dv,
        } = B::fused_causal_attention_backward(q, k, v, grad, heads);
        for (parent, value) in [(q_parent, dq), (k_parent, dk), (v_parent, dv)] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, value);
            }
        }
    }
}

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match Gelu
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (output, saved) = B::fused_gelu_saving(x.primitive);
                prep.finish(saved, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_gelu(x.primitive)),
        }
    }

    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [x.node.clone(), weight.node.clone(), bias.node.clone()];
        match Linear.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::fused_linear(
                    x.primitive.clone(),
                    weight.primitive.clone(),
                    bias.primitive,
                );
                prep.finish((x.primitive, weight.primitive), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_linear(
                x.primitive,
                weight.primitive,
                bias.primitive,
            )),
        }
    }

    fn fused_softmax(x: FloatTensor<Self>, dim: usize) -> FloatTensor<Self> {
        match Softmax
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::fused_softmax(x.primitive, dim);
                prep.finish((output.clone(), dim), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_softmax(x.primitive, dim)),
        }
    }

    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        match CrossEntropy
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::fused_cross_entropy(logits.primitive.clone(), targets.clone());
                prep.finish((logits.primitive, targets), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::fused_cross_entropy(logits.primitive, targets))
            }
        }
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let nodes = [x.node.clone(), gamma.node.clone(), beta.node.clone()];
        match LayerNorm.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::fused_layer_norm(
                    x.primitive.clone(),
                    gamma.primitive.clone(),
                    beta.primitive,
                    epsilon,
                );
                prep.finish((x.primitive, gamma.primitive, epsilon), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_layer_norm(
                x.primitive,
                gamma.primitive,
                beta.primitive,
                epsilon,
            )),
        }
    }

    fn fused_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        match CausalAttention
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::fused_causal_attention(
                    q.primitive.clone(),
                    k.primitive.clone(),
                    v.primitive.clone(),
                    heads,
                );
                prep.finish((q.primitive, k.primitive, v.primitive, heads), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_causal_attention(
                q.primitive,
                k.primitive,
                v.primitive,
                heads,
            )),
        }
    }

    // The backward methods of a differentiable backend are only reached by a second
    // derivative, which kiln never takes: the defaults (Burn's ops, themselves
    // differentiable) serve it. So does `fused_adamw`: optimizers step the inner
    // backend's tensors.
}
