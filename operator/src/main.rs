//! `dsr-operator` is still a stub: the operator issue fills it.

fn main() {
    eprintln!("dsr-operator is not implemented yet; see the operator issue");
    std::process::exit(2);
}
