//! A host agent in the test's own process: the agent's real code (its HTTP routes, its
//! repository, its VM manager) over a private libvirt test-driver instance whose started
//! domains run the simulated harness ([`crate::hypervisor::SimulatedGuests`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use certo_agent::AgentSettings;
use certo_hosts::hypervisor::{Hypervisor, LibvirtHypervisor};

use crate::hypervisor::SimulatedGuests;

/// A running in-process agent; stopped, and its directory removed, when dropped.
#[derive(Debug)]
pub struct SimulatedHost {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// Its repository, VM files and test-driver node under here.
    pub dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Fault injection: while above zero, each test result its guests report fails (see
    /// [`SimulatedGuests::with_failures`]).
    pub guest_failures: Arc<std::sync::atomic::AtomicU32>,
}

impl Drop for SimulatedHost {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl SimulatedHost {
    /// Starts host `name` with `token` and `slots`, over the simulated hypervisor as `wrap`
    /// makes it into the one the agent uses (`|hv| hv`, or with faults injected).
    pub async fn start(
        name: &str,
        token: &str,
        slots: usize,
        wrap: impl FnOnce(Arc<dyn Hypervisor>) -> Arc<dyn Hypervisor>,
    ) -> SimulatedHost {
        Self::start_registered(name, token, slots, None, wrap).await
    }

    /// Like [`SimulatedHost::start`]; with `orchestrator`, the agent registers with it and
    /// sends heartbeats every second, as a deployed agent does (the engine places work on
    /// registered hosts with fresh heartbeats).
    pub async fn start_registered(
        name: &str,
        token: &str,
        slots: usize,
        orchestrator: Option<String>,
        wrap: impl FnOnce(Arc<dyn Hypervisor>) -> Arc<dyn Hypervisor>,
    ) -> SimulatedHost {
        let dir = crate::target_tmp().join(format!("agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        // A test-driver instance of its own (test:///default is shared by the whole process).
        let node = dir.join("test-node.xml");
        std::fs::write(&node, "<node>\n</node>\n").unwrap_or_else(|e| panic!("node xml: {e}"));
        let uri = format!("test://{}", node.display());
        let libvirt = LibvirtHypervisor::connect(&uri)
            .unwrap_or_else(|e| panic!("the test driver at {uri}: {e}"));
        let guest_failures: Arc<std::sync::atomic::AtomicU32> = Default::default();
        let hv = wrap(Arc::new(
            SimulatedGuests::new(Arc::new(libvirt)).with_failures(guest_failures.clone()),
        ));
        let settings = AgentSettings {
            listen: ([127, 0, 0, 1], 0).into(),
            repo: dir.join("repo"),
            token: certo_transfer::Token::new(token).unwrap_or_else(|e| panic!("token: {e}")),
            name: name.to_owned(),
            libvirt: uri,
            slots,
            memory_mib: 4096,
            vcpus: 2,
            vm_dir: dir.join("vms"),
            orchestrator,
            advertise: None,
            heartbeat: Duration::from_secs(1),
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let result = certo_agent::run_with(
                settings,
                hv,
                move |addr| {
                    let _ = ready_tx.send(addr);
                },
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await;
            if let Err(e) = result {
                panic!("the agent failed: {e}");
            }
        });
        let addr = ready_rx
            .await
            .unwrap_or_else(|_| panic!("the agent {name} did not start"));
        SimulatedHost {
            url: format!("http://{addr}"),
            dir,
            stop: Some(stop_tx),
            guest_failures,
        }
    }
}
