# Rust components and targets the other steps use.
source scripts/lib.sh
need_component clippy rustfmt
need_target thumbv7em-none-eabihf
