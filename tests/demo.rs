//! The README's run command (`just demo` → `hack/demo.sh up`) against the local control
//! plane: it survives a busy default port, and it fails loudly — non-zero, with the
//! reason, never "done" — when what it starts cannot work.

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `hack/demo.sh ARG` with the binaries this test run built.
fn demo(arg: &str, env: &[(&str, String)]) -> Output {
    // CARGO_BIN_EXE_… is <target>/debug/llm-proxy; the script wants <target>.
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_llm-proxy"));
    let target = binary.parent().and_then(|debug| debug.parent()).unwrap();
    let mut command = Command::new("bash");
    command
        .arg(support::repo().join("hack/demo.sh"))
        .arg(arg)
        .env("CARGO_TARGET_DIR", target)
        .env("KUBECONFIG", support::kubeconfig())
        .env("KUBECTL", support::kubectl());
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// A port held by this test for as long as the listener lives.
fn hold(port: u16) -> Option<TcpListener> {
    TcpListener::bind(("127.0.0.1", port)).ok()
}

#[tokio::test]
async fn the_demo_survives_a_busy_port_and_fails_loudly_when_it_cannot_work() {
    let client = support::client().await;
    support::install_crds(&client).await;

    // The fake upstream's default port is taken (by this test, or by anything else).
    let _held = hold(18080);
    let out = demo("up", &[]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("port 18080 is busy"), "{said}");
    assert!(said.contains("chat.completion") && said.contains("==> done"), "{said}");

    // A port the user chose that is busy: the reason, a non-zero exit, no "done".
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = demo("up", &[("DEMO_UPSTREAM_PORT", port.clone())]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(&format!("port {port}")) && said.contains("DEMO_UPSTREAM_PORT"), "{said}");
    assert!(!said.contains("==> done"), "{said}");

    let out = demo("down", &[]);
    assert!(out.status.success(), "{}", text(&out));
}
