//! `ovlsnap`, the snapshot command line (issue 5): a thin client of the snap-fs control socket,
//! plus offline commands that read the store directly. It must hold no filesystem logic.
//! Nothing is implemented yet.

fn main() {
    eprintln!("ovlsnap: snapshots are not implemented yet (see issue 5)");
    std::process::exit(1);
}
