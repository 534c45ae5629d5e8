//! Refuses to build edgespool unless its bundled SQLite keeps WAL indexes in /dev/shm
//! (`SQLITE_SHM_DIRECTORY`, set for every build in the repository by
//! `.cargo/config.toml`): the agent locks `NAME-shm` beside the spool to keep other
//! programs out (`src/spool/index.rs`), so a SQLite that kept its index there would be
//! shut out of the agent's own spool.

const FLAG: &str = "-DSQLITE_SHM_DIRECTORY=\"/dev/shm\"";

fn main() {
    println!("cargo:rerun-if-env-changed=LIBSQLITE3_FLAGS");
    let flags = std::env::var("LIBSQLITE3_FLAGS").unwrap_or_default();
    if !flags.split_whitespace().any(|flag| flag == FLAG) {
        eprintln!(
            "edgespool: LIBSQLITE3_FLAGS is {flags:?}; it must hold {FLAG} (the WAL index in /dev/shm). \
             Build from within the repository, whose .cargo/config.toml sets it, or add it to your own flags."
        );
        std::process::exit(1);
    }
}
