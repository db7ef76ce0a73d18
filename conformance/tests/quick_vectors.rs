use sage_conformance::vectors::*;
#[test]
fn cpu_vectors() {
    for f in files_in(&default_dir()).unwrap() {
        let v = VectorFile::load(&f).unwrap();
        let r = replay(&mut sage_cpu::Cpu, &v);
        println!("{} {:?}", f.display(), r);
        r.unwrap();
    }
}
