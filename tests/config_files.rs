//! Shipped configuration files load, and bad ones are refused with the key named.

use std::collections::HashMap;
use std::process::Command;

use tmdb_proxy::Config;

fn config_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

#[test]
fn every_shipped_config_parses_and_validates() {
    let mut seen = 0;
    for entry in std::fs::read_dir(config_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        Config::from_toml_with_env(&text, Some(HashMap::new()))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(seen >= 1);
}

#[test]
fn shipped_default_config_matches_the_built_in_defaults() {
    let text = std::fs::read_to_string(config_dir().join("tmdb-proxy.toml")).unwrap();
    let shipped = Config::from_toml_with_env(&text, Some(HashMap::new())).unwrap();
    let builtin = Config::from_toml_str("").unwrap();
    assert_eq!(format!("{shipped:?}"), format!("{builtin:?}"));
}

#[test]
fn a_typo_is_rejected() {
    let err = Config::from_toml_str("[upstream]\nbase_ulr = \"http://127.0.0.1:1\"\n").unwrap_err();
    assert!(err.to_string().contains("base_ulr"), "{err}");
}

fn run_binary(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tmdb-proxy"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("binary runs")
}

#[test]
fn binary_refuses_a_bad_config_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("tmdb-proxy-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[limit]\nrequests_per_second = 0\n").unwrap();
    let out = run_binary(&["--config", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("limit.requests_per_second"), "{stderr}");

    let out = run_binary(
        &["--config", dir.join("missing.toml").to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));

    // An environment override is validated like the file.
    let good = dir.join("good.toml");
    std::fs::write(&good, "").unwrap();
    let out = run_binary(
        &["--config", good.to_str().unwrap()],
        &[("TMDB_PROXY__SERVER__LISTEN", "not-an-address")],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen"));

    // TLS files that exist but hold no certificate are refused before anything binds, by
    // `check` too.
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not PEM\n").unwrap();
    let tls = dir.join("tls.toml");
    std::fs::write(
        &tls,
        format!(
            "[server.tls]\ncert_file = \"{0}\"\nkey_file = \"{0}\"\n",
            junk.display()
        ),
    )
    .unwrap();
    for args in [vec!["check"], vec![]] {
        let mut args = args;
        args.extend(["--config", tls.to_str().unwrap()]);
        let out = run_binary(&args, &[]);
        assert_eq!(out.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("server.tls.cert_file"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_prints_the_effective_config_without_secrets() {
    let path = config_dir().join("tmdb-proxy.toml");
    let out = run_binary(
        &["check", "--config", path.to_str().unwrap()],
        &[("TMDB_PROXY__KEYS__DEFAULT_API_KEY", "supersecretkey123")],
    );
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("requests_per_second"));
    assert!(!all.contains("supersecretkey123"));
}
