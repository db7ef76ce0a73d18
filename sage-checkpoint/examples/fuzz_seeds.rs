//! `cargo run -p sage-checkpoint --example fuzz_seeds -- DIR`: writes valid checkpoints into
//! DIR, the seed corpus of the fuzz target (`fuzz/`).

#[path = "../fuzz/body.rs"]
mod body;

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "sage-checkpoint/fuzz/corpus/load".into());
    std::fs::create_dir_all(&dir)?;
    for (i, s) in body::seeds().iter().enumerate() {
        body::exercise(s);
        let path = std::path::Path::new(&dir).join(format!("seed-{i}.safetensors"));
        std::fs::write(&path, s)?;
        println!("{}", path.display());
    }
    Ok(())
}
