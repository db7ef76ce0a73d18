//! Programs built once per storage type and kept, kernel objects, and the enqueue.

use super::*;

impl OpenCl {
    pub(super) fn program(&self, key: ProgramKey) -> Result<Program, Error> {
        let sh = &self.shared;
        let mut programs = sh.programs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = programs.get(&key) {
            return Ok(p.clone());
        }
        let src = match key {
            ProgramKey::Step(p, s) => source::step_program(p, s, sh.slots, sh.per_item),
            ProgramKey::Norm(e) => source::norm_program(e, sh.slots, sh.norm_fp64, sh.per_item > 1),
        };
        let src = CString::new(src).expect("generated source has no NUL");
        let program = core::create_program_with_source(&sh.context, &[src])
            .map_err(|e| Error::cl("creating a program", e))?;
        if let Err(e) = core::build_program(&program, Some(&[sh.desc.id]), &sh.options, None, None)
        {
            let log = match core::get_program_build_info(
                &program,
                sh.desc.id,
                ProgramBuildInfo::BuildLog,
            ) {
                Ok(ProgramBuildInfoResult::BuildLog(l)) if !l.trim().is_empty() => l,
                _ => e.to_string(),
            };
            return Err(Error::Build {
                program: key.name(),
                log,
            });
        }
        programs.insert(key, program.clone());
        Ok(program)
    }

    /// Kernel `name` of program `key` and the work-group size to launch it with.
    pub(super) fn kernel(
        &mut self,
        key: ProgramKey,
        name: &'static str,
    ) -> Result<(Kernel, usize), Error> {
        if let Some(k) = self.kernels.get(&(key, name)) {
            return Ok(k.clone());
        }
        let program = self.program(key)?;
        let k =
            core::create_kernel(&program, name).map_err(|e| Error::cl("creating a kernel", e))?;
        let max = match core::get_kernel_work_group_info(
            &k,
            self.shared.desc.id,
            KernelWorkGroupInfo::WorkGroupSize,
        ) {
            Ok(KernelWorkGroupInfoResult::WorkGroupSize(n)) if n > 0 => n,
            _ => 1,
        };
        // CPU devices run a work-group as a loop over its work-items, each taking a run of
        // elements: a few of them per group, so that a small tensor fills its group.
        let local = if self.shared.per_item > 1 {
            CPU_LOCAL
        } else {
            LOCAL
        };
        let mut wg = max.min(local);
        if name.starts_with("sage_cl_norm_partials") || name.starts_with("sage_cl_read_floor") {
            wg = if self.shared.per_item > 1 {
                // One work-item per chunk: a work-group of a few chunks is enough.
                wg.min(NORM_CPU_LOCAL)
            } else {
                // The tree reduction halves: a power of two (so it also divides the chunk).
                1 << (usize::BITS - 1 - wg.leading_zeros())
            };
        }
        self.kernels.insert((key, name), (k.clone(), wg));
        Ok((k, wg))
    }

    pub(super) fn enqueue(&self, k: &Kernel, groups: usize, wg: usize) -> Result<(), Error> {
        let gws = groups
            .checked_mul(wg)
            .ok_or_else(|| Error::TooLarge(format!("{groups} work-groups")))?;
        // SAFETY: every argument was set and every buffer is at least as long as the
        // lengths in the launch table, which the kernels check each index against.
        unsafe {
            core::enqueue_kernel(
                &self.shared.queue,
                k,
                1,
                None,
                &[gws, 1, 1],
                Some([wg, 1, 1]),
                None::<()>,
                None::<()>,
            )
        }
        .map_err(|e| Error::cl("launching a kernel", e))
    }
}
