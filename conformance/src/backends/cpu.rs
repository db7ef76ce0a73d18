//! sage-cpu.

use sage_core::Element;
use sage_cpu::Cpu;

use crate::harness::Harness;
use crate::suite::{run_suite, Options, Row};

impl Harness for Cpu {
    type Owned<E: Element> = Vec<E>;
    fn name(&self) -> String {
        "cpu".into()
    }
    fn upload<E: Element>(&mut self, data: &[E]) -> Result<Vec<E>, Self::Error> {
        Ok(data.to_vec())
    }
    fn download<E: Element>(&mut self, buf: &Vec<E>) -> Result<Vec<E>, Self::Error> {
        Ok(buf.clone())
    }
    fn buf<E: Element>(o: &Vec<E>) -> &[E] {
        o
    }
    fn buf_mut<E: Element>(o: &mut Vec<E>) -> &mut [E] {
        o
    }
}

/// The suite on the CPU backend.
pub fn run(opts: &Options) -> Vec<Row> {
    run_suite(Cpu, opts)
}
