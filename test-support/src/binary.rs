//! The real binary: `meterd run` with a clean environment, waiting for it to be ready, SIGTERM,
//! and the rig of an in-process emulator for it. These run on real time by necessity.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::process::{Child, Command};

use meterd::clock::SharedClock;
use meterd::emulator::{EmulatorConfig, EmulatorHandle};
use meterd::local_client::{self, Target};

use crate::{agent_toml, emulator_and_key, eventually, free_port, AgentToml};

/// Sends SIGTERM to a running child (the agent's shutdown path).
pub fn sigterm(child: &Child) {
    let pid = child.id().expect("running child");
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

/// `meterd run` with a cleared environment, static credentials and IMDS disabled, so nothing
/// leaves loopback. Callers may add variables.
pub fn agent_command(bin: &str, config: &Path, cwd: &Path, access_key: &str) -> Command {
    let mut cmd = agent_command_without_keys(bin, config, cwd);
    cmd.env("AWS_ACCESS_KEY_ID", access_key)
        .env("AWS_SECRET_ACCESS_KEY", "secret");
    cmd
}

/// [`agent_command`] without credentials: callers set a credential flow's variables.
pub fn agent_command_without_keys(bin: &str, config: &Path, cwd: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TZ", "UTC")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("METERD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Waits until the agent at `addr` answers `/readyz` 200; fails if it exits or takes 30 s.
pub async fn wait_ready(addr: &str, child: &mut Child) {
    let target = Target::Tcp(addr.to_owned());
    let child = tokio::sync::Mutex::new(child);
    eventually("the agent ready", Duration::from_secs(30), async || {
        let mut child = child.lock().await;
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            panic!("agent exited during start-up with {status}: {err}");
        }
        let ready = local_client::call(
            &target,
            Method::GET,
            "/readyz",
            None,
            None,
            Duration::from_secs(1),
        )
        .await;
        matches!(ready, Ok((StatusCode::OK, _)))
    })
    .await;
}

/// For the real binary: an emulator in this process (so it outlives every kill of the agent)
/// and an agent configuration file listening on a free loopback port.
pub struct BinaryRig {
    pub emulator: EmulatorHandle,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub addr: String,
}

impl BinaryRig {
    pub async fn new(clock: SharedClock, server_extra: &str, sending: &str) -> Self {
        Self::with_metering(clock, server_extra, sending, EmulatorConfig::demo(), None).await
    }

    /// [`Self::new`] for another emulator product and other `[metering]` lines.
    pub async fn with_metering(
        clock: SharedClock,
        server_extra: &str,
        sending: &str,
        emulator_config: EmulatorConfig,
        metering: Option<&str>,
    ) -> Self {
        let (emulator, dir, key) = emulator_and_key(emulator_config, clock).await;
        let addr = format!("127.0.0.1:{}", free_port());
        let config_path = dir.path().join("meterd.toml");
        std::fs::write(
            &config_path,
            agent_toml(&AgentToml {
                key: &key,
                state: &dir.path().join("state"),
                endpoint: &emulator.endpoint_url(),
                listen: &addr,
                server_extra,
                sending,
                metering,
            }),
        )
        .expect("config");
        Self {
            emulator,
            dir,
            config_path,
            addr,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// POST /v1/usage to the agent on this rig.
    pub async fn post(&self, body: &serde_json::Value) -> (http::StatusCode, serde_json::Value) {
        let target = meterd::local_client::Target::Tcp(self.addr.clone());
        let body = body.to_string().into_bytes();
        crate::request(&target, http::Method::POST, "/v1/usage", Some(body), None).await
    }

    /// `meterd run` on this rig's configuration, from its directory.
    pub fn command(&self, bin: &str, access_key: &str) -> Command {
        agent_command(bin, &self.config_path, self.dir.path(), access_key)
    }
}
