//! Launch planning: which tensors share a launch (packed or not), the launch tables and their
//! arguments, and the launch counters.

use super::*;

/// Where reused launches are counted in `Shared::launches` (they also count as packed steps).
pub(super) const REUSED: usize = 4;

/// Where a launch is counted in `Shared::launches`.
pub(super) fn launch_index(norm: bool, packed: bool) -> usize {
    2 * usize::from(norm) + usize::from(!packed)
}

/// Fewest consecutive tensors sharing their root buffers that take a packed launch.
pub(super) const MIN_PACKED: usize = 2;

/// Multi-tensor launches enqueued on a device ([`OpenCl::launch_counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchCounts {
    /// Packed fused steps and floors: any number of tensors cut from the same buffers.
    pub packed_steps: u64,
    /// Fused steps and floors with each tensor's own buffers.
    pub steps: u64,
    /// Packed gradient-norm (and read-floor) passes.
    pub packed_norms: u64,
    /// Gradient-norm passes with each buffer its own argument.
    pub norms: u64,
    /// Of the packed steps and floors, those that reused the tables of the last one over the
    /// same layout, uploading only their coefficients.
    pub reused: u64,
}

/// One launch of a step: `count` items from `first`; packed (one set of root buffers, the
/// tensors at offsets) or with each tensor's own buffers.
pub(super) struct Launch {
    pub(super) first: usize,
    pub(super) count: usize,
    pub(super) packed: bool,
    pub(super) groups: usize,
}

/// The launches of `keys.len()` items, in item order (so that a failure part-way leaves a
/// prefix done, and partials come back in item order): runs of at least [`MIN_PACKED`]
/// consecutive items with the same key (`None`: cannot be packed) go packed, the others up to
/// `per` at a time.
pub(super) fn plan_launches<K: PartialEq>(keys: &[Option<K>], per: usize) -> Vec<Launch> {
    let mut launches: Vec<Launch> = Vec::new();
    let mut i = 0;
    while i < keys.len() {
        let run = match &keys[i] {
            Some(k) => keys[i..]
                .iter()
                .take_while(|o| o.as_ref() == Some(k))
                .count(),
            None => 1,
        };
        if run >= MIN_PACKED {
            launches.push(Launch {
                first: i,
                count: run,
                packed: true,
                groups: 0,
            });
            i += run;
            continue;
        }
        match launches.last_mut() {
            Some(l) if !l.packed && l.count < per && l.first + l.count == i => l.count += 1,
            _ => launches.push(Launch {
                first: i,
                count: 1,
                packed: false,
                groups: 0,
            }),
        }
        i += 1;
    }
    launches
}

/// A launch table on the device: its slots and its coefficients.
pub(super) struct DeviceTable {
    pub(super) slots: Mem,
    pub(super) coeffs: Mem,
}

/// Sets a step kernel's leading arguments (`SAGE_CL_TABLE_ARGS`): the slots, the
/// coefficients, and `base`, the launch's first tensor in the slots. Returns the next
/// argument's index.
pub(super) fn set_table(k: &Kernel, slots: &Mem, coeffs: &Mem, base: u32) -> Result<u32, Error> {
    let set = |i: u32, a: ArgVal| {
        core::set_kernel_arg(k, i, a).map_err(|e| Error::cl("setting a kernel argument", e))
    };
    set(0, ArgVal::mem(slots))?;
    set(1, ArgVal::mem(coeffs))?;
    set(2, ArgVal::scalar(&base))?;
    Ok(3)
}

/// Launches kept per kernel: a step whose tensors come in a few calls (slices of different
/// storage types, say) keeps one for each.
pub(super) const KEPT_PER_KERNEL: usize = 4;

/// Where the launch of the multi-tensor kernel `name` is kept in `OpenCl::kept`.
pub(super) fn kept_index(name: &str) -> usize {
    usize::from(name != "sage_cl_step")
}

/// The packed form of the multi-tensor kernel `name`.
pub(super) fn packed_name(name: &str) -> &'static str {
    match name {
        "sage_cl_step" => "sage_cl_step_packed",
        _ => "sage_cl_floor_packed",
    }
}

/// Sets a packed launch's arguments after its table's (from index `a`): its tensor count, the
/// step's non-finite counters (`None`: not counted), each work-group's slot, and the five
/// root buffers its tensors are cut from.
pub(super) fn set_packed(
    k: &Kernel,
    a: u32,
    count: usize,
    bad: Option<&Mem>,
    group_slot: &Mem,
    roots: [Option<&Mem>; 5],
) -> Result<(), Error> {
    let set = |i: u32, v: ArgVal| {
        core::set_kernel_arg(k, i, v).map_err(|e| Error::cl("setting a kernel argument", e))
    };
    set(a, ArgVal::scalar(&(count as u32)))?;
    set(a + 1, opt_mem(bad))?;
    set(a + 2, ArgVal::mem(group_slot))?;
    for (j, r) in roots.into_iter().enumerate() {
        set(a + 3 + j as u32, opt_mem(r))?;
    }
    Ok(())
}

/// A buffer argument, or NULL for an absent state buffer.
pub(super) fn opt_mem(m: Option<&Mem>) -> ArgVal<'_> {
    m.map_or_else(ArgVal::mem_null, ArgVal::mem)
}
