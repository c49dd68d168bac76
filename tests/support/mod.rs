//! Harness shared by the integration test binaries (each uses a part of it).
#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::process::{Child, Command};

use meterd::local_client::{self, Target};

/// The emulator's demo product, which every harness meters.
pub const PRODUCT: &str = "prod-demo1234";

/// What differs between the harnesses' agent configurations.
pub struct AgentToml<'a> {
    /// The emulator's public key, trusted in addition to the bundled keyring.
    pub key: &'a Path,
    pub state: &'a Path,
    pub endpoint: &'a str,
    pub listen: &'a str,
    /// Extra lines for `[server]`.
    pub server_extra: &'a str,
    /// The lines of `[sending]`.
    pub sending: &'a str,
}

/// An agent configuration for the demo product against the emulator.
pub fn agent_toml(t: &AgentToml<'_>) -> String {
    format!(
        r#"
product_code = "{PRODUCT}"
platform = "ecs"
[metering]
dimensions = ["requests", "gigabytes"]
tag_keys = ["tenant", "region"]
[registration]
public_key_files = [{key:?}]
[server]
listen = "{listen}"
grace_period = "10s"
{server_extra}
[state]
dir = {state:?}
[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
[sending]
{sending}
"#,
        key = t.key.display().to_string(),
        state = t.state.display().to_string(),
        listen = t.listen,
        server_extra = t.server_extra,
        endpoint = t.endpoint,
        sending = t.sending,
    )
}

/// `meterd run` with a cleared environment, static credentials and IMDS disabled, so nothing
/// leaves loopback. Callers may add variables.
pub fn agent_command(bin: &str, config: &Path, cwd: &Path, access_key: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TZ", "UTC")
        .env("AWS_ACCESS_KEY_ID", access_key)
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("METERD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Waits until the agent at `addr` answers `/readyz` 200; fails if it exits or takes 30 s.
pub async fn wait_ready(addr: &str, child: &mut Child) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            panic!("agent exited during start-up with {status}: {err}");
        }
        let ready = local_client::call(
            &Target::Tcp(addr.to_owned()),
            Method::GET,
            "/readyz",
            None,
            None,
            Duration::from_secs(1),
        )
        .await;
        if matches!(ready, Ok((StatusCode::OK, _))) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent never became ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
