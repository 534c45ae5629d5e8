//! `check-config` refuses, with the file, line and column, what would only fail once the
//! agent runs: a prefix that leaves its folder, a spool that is a device, a device id
//! that is a folder step, a budget the spool cannot hold, a file that is not UTF-8 text,
//! a folder given as the file, an unset `${VARIABLE}`.

use std::path::Path;

use edgespool_tests::edgespool;

const GOOD: &str = "[agent]\ndevice_id = \"pi-1\"\nspool = \"/tmp/never-used/spool.db\"\n\n[[sources]]\nkind = \"system\"\n\n[[sinks]]\nkind = \"local\"\npath = \"/tmp/never-used/out\"\n";

/// What `check-config` prints on stderr for `path`, which it must refuse, with the path
/// written as `bad.toml`.
fn refused(path: &Path) -> String {
    let out = edgespool(&["check-config", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1), "a bad config fails");
    assert!(out.stdout.is_empty(), "nothing is printed as valid");
    String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "bad.toml")
}

fn refused_bytes(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, bytes).expect("write");
    refused(&path)
}

#[test]
fn settings_that_would_fail_at_run_time_fail_the_check() {
    let escape = format!("{GOOD}prefix = \"../../escape\"\n");
    assert_eq!(
        refused_bytes(escape.as_bytes()),
        "error: bad.toml:11:10: sink \"local\": prefix \"../../escape\" has a \"..\" segment; a prefix is plain segments separated by '/', e.g. \"lake/raw\": no leading '/', no empty, \".\" or \"..\" segment, no '\\' and no control characters\n"
    );
    let null = GOOD.replace("/tmp/never-used/spool.db", "/dev/null");
    assert_eq!(
        refused_bytes(null.as_bytes()),
        "error: bad.toml:3:9: agent.spool \"/dev/null\" is a character device, not a regular file: the spool is an SQLite file (with -wal and -shm files beside it); give a path that is a regular file or does not exist yet\n"
    );
    assert!(
        !Path::new("/dev/null-journal").exists() || Path::new("/dev/null-journal").is_file(),
        "the check creates nothing beside /dev/null"
    );
    let dots = GOOD.replace("\"pi-1\"", "\"..\"");
    assert_eq!(
        refused_bytes(dots.as_bytes()),
        "error: bad.toml:2:13: agent.device_id \"..\" must be 1 to 64 characters: letters, digits, '-', '_' and '.', starting with a letter or digit\n"
    );
    let huge = GOOD.replace("[agent]\n", "[agent]\ndisk_budget = \"16 EiB\"\n");
    assert_eq!(
        refused_bytes(huge.as_bytes()),
        "error: bad.toml:2:15: agent.disk_budget (16.0 EiB) must be at least 1 MiB and at most 4 TiB (the most an SQLite spool of 1 KiB pages can hold)\n"
    );
}

#[test]
fn a_file_that_is_no_configuration_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        refused(dir.path()),
        "error: bad.toml: is a folder; give the path of the TOML file\n"
    );
    assert_eq!(
        refused_bytes(b"SQLite format 3\0"),
        "error: bad.toml:1:16: is not a text file (it holds a NUL byte here); give the path of the TOML file\n"
    );
    // "café" in Latin-1.
    let mut bytes = GOOD.replace("pi-1", "caf#").into_bytes();
    let at = bytes.iter().position(|&b| b == b'#').expect("a #");
    bytes[at] = 0xE9;
    assert_eq!(
        refused_bytes(&bytes),
        "error: bad.toml:2:17: invalid UTF-8 (byte 0xE9); save the file as UTF-8\n"
    );
    let unset = format!(
        "{GOOD}\n[[sources]]\nkind = \"http\"\nname = \"api\"\nurl = \"http://127.0.0.1:9/\"\nheaders = {{ Authorization = \"Bearer ${{EDGESPOOL_NEVER_SET_3F9}}\" }}\n[[sources.fields]]\nname = \"x\"\npointer = \"/x\"\n"
    );
    assert_eq!(
        refused_bytes(unset.as_bytes()),
        "error: bad.toml:16:37: environment variable EDGESPOOL_NEVER_SET_3F9 is not set; set it for the agent (systemd: Environment= or EnvironmentFile=), or write $${ for a literal ${\n"
    );
}
