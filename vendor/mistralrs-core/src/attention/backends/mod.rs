pub(super) mod cpu;
mod flash;
mod naive;
mod sinks;

pub(crate) use cpu::{current_kv_pads, with_kv_pads};
pub(crate) use flash::flash_attn;
pub(crate) use naive::{maybe_synchronize, naive_sdpa};
pub(crate) use sinks::sinks_attn;
