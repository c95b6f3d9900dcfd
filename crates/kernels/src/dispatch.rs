//! Where code generic over any `B: Backend` reaches kiln's kernels.
//!
//! Rust has no specialisation, so a generic function cannot ask the compiler
//! whether its `B` implements [`FusedOps`] with kernels of its own. The coordinator
//! trains any backend, yet its loss and its optimizer step should run fused on
//! Flex: this module compares `B` with the backends that have kiln kernels by
//! `TypeId` and, on a match, moves the arguments into that backend's types (a
//! checked downcast, no `unsafe`). Every other backend gets Burn's ops
//! ([`crate::reference`]), the results of [`FusedOps`]'s defaults.

use std::any::{Any, TypeId};

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::adamw_step::{AdamWStep, AdamWUpdate};
#[cfg(feature = "flex")]
use crate::ops::FusedOps;
use crate::reference;

/// `value` as a `U`, when `T` is `U`; `value` back otherwise.
fn cast<T: 'static, U: 'static>(value: T) -> Result<U, T> {
    let mut slot = Some(value);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(same) => Ok(same
            .take()
            .unwrap_or_else(|| unreachable!("the slot was full"))),
        None => Err(slot.unwrap_or_else(|| unreachable!("the slot was full"))),
    }
}

/// `value` from a backend `K`'s types to `B`'s, after `B` was found to be `K`.
fn back<T: 'static, U: 'static>(value: T) -> U {
    cast(value).unwrap_or_else(|_| unreachable!("B was compared with K by TypeId"))
}

/// Whether `B` is `K`.
fn is<B: 'static, K: 'static>() -> bool {
    TypeId::of::<B>() == TypeId::of::<K>()
}

/// [`FusedOps::fused_cross_entropy`] where `B` has kiln's kernels (`Flex`, and
/// `Autodiff<Flex>`, where it is one node with a fused backward), Burn's ops
/// elsewhere.
pub(crate) fn cross_entropy<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
) -> FloatTensor<B> {
    #[cfg(feature = "flex")]
    {
        use burn::backend::{Autodiff, Flex};
        type Train = Autodiff<Flex>;
        if is::<B, Train>() {
            let (logits, targets) = back((logits, targets));
            return back(Train::fused_cross_entropy(logits, targets));
        }
        if is::<B, Flex>() {
            let (logits, targets) = back((logits, targets));
            return back(Flex::fused_cross_entropy(logits, targets));
        }
    }
    reference::cross_entropy::<B>(logits, targets)
}

/// [`FusedOps::fused_adamw`] where `B` has kiln's kernels (`Flex`: in place, one
/// pass), Burn's ops elsewhere; the same bits either way.
pub(crate) fn adamw<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    moments: Option<(FloatTensor<B>, FloatTensor<B>)>,
    step: &AdamWStep,
) -> AdamWUpdate<B> {
    #[cfg(feature = "flex")]
    {
        use burn::backend::Flex;
        if is::<B, Flex>() {
            let (param, grad, moments) = back((param, grad, moments));
            return back(Flex::fused_adamw(param, grad, moments, step));
        }
    }
    reference::adamw::<B>(param, grad, moments, step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_casts_to_its_own_type_only() {
        assert_eq!(cast::<u32, u32>(7), Ok(7));
        assert_eq!(cast::<u32, i32>(7), Err(7));
        assert!(is::<u8, u8>() && !is::<u8, i8>());
    }
}
