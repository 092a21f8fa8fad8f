//! The mockall mock (feature `mock`) stands in for `dyn GuestAgent`, also behind the `Box` and
//! `Arc` the facade hands out: every typed method forwards through the pointer, so an
//! expectation on it is met there and `execute_raw` is never reached.
#![cfg(feature = "mock")]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use qga_proto::cmd::{GuestExecArgs, COMMANDS};
use qga_proto::types::*;
use qga_proto::{Error, ErrorClass, GuestAgent, MockGuestAgent};
use serde_json::Value;

async fn describe(agent: &dyn GuestAgent) -> String {
    match agent.host_name().await {
        Ok(h) => h.host_name,
        Err(e) if e.is_unsupported() => "<no host name>".into(),
        Err(e) => format!("<{e}>"),
    }
}

#[tokio::test]
async fn mock_expectations_on_typed_methods() {
    let mut mock = MockGuestAgent::new();
    mock.expect_host_name().times(1).returning(|| {
        Ok(GuestHostName {
            host_name: "mocked".into(),
        })
    });
    assert_eq!(describe(&mock).await, "mocked");

    let mut mock = MockGuestAgent::new();
    mock.expect_host_name().returning(|| {
        Err(Error::Agent {
            class: ErrorClass::CommandNotFound,
            desc: "Command guest-get-host-name has been disabled".into(),
        })
    });
    assert_eq!(describe(&mock).await, "<no host name>");
}

#[tokio::test]
async fn expectations_hold_behind_the_facades_box_and_arc() {
    let mut mock = MockGuestAgent::new();
    mock.expect_osinfo().times(2).returning(|| {
        Ok(GuestOSInfo {
            id: Some("mocked".into()),
            ..Default::default()
        })
    });
    mock.expect_execute_raw().never();
    let boxed: Box<dyn GuestAgent> = Box::new(mock);
    assert_eq!(boxed.osinfo().await.unwrap().id.as_deref(), Some("mocked"));
    let shared: Arc<dyn GuestAgent> = Arc::new(boxed);
    assert_eq!(shared.osinfo().await.unwrap().id.as_deref(), Some("mocked"));
}

/// Expands to the pattern `_` for each argument: the closure parameters of `returning`.
macro_rules! ignore {
    ($x:expr) => {
        _
    };
}

/// For every typed method listed: a mock that expects exactly one call of it, answers with an
/// error naming the method, and refuses `execute_raw`, called through `Box<dyn>`, `Box<Mock>`,
/// `Arc<dyn>` and `Arc<Mock>`. A method that did not forward would run its default body, reach
/// `execute_raw` and panic, and leave its expectation unmet. The same list runs against a
/// recorder of command names, which must cover every command of the protocol: a method added
/// for a new command has to be listed here, and is then checked for forwarding.
macro_rules! forwarding_checks {
    ($( $method:ident ( $($arg:expr),* ); )*) => {
        async fn through_pointers() {
            $(
                for pointer in ["Box<dyn>", "Box<Mock>", "Arc<dyn>", "Arc<Mock>"] {
                    let mut mock = MockGuestAgent::new();
                    mock.expect_execute_raw().never();
                    expect_once!(mock, $method, $($arg),*);
                    let result = match pointer {
                        "Box<dyn>" => {
                            let agent: Box<dyn GuestAgent> = Box::new(mock);
                            agent.$method($($arg),*).await.map(drop)
                        }
                        "Box<Mock>" => Box::new(mock).$method($($arg),*).await.map(drop),
                        "Arc<dyn>" => {
                            let agent: Arc<dyn GuestAgent> = Arc::new(mock);
                            agent.$method($($arg),*).await.map(drop)
                        }
                        _ => Arc::new(mock).$method($($arg),*).await.map(drop),
                    };
                    match result {
                        Err(Error::Protocol { detail }) => assert_eq!(
                            detail,
                            stringify!($method),
                            "{} through {pointer}",
                            stringify!($method)
                        ),
                        other => panic!("{} through {pointer}: {other:?}", stringify!($method)),
                    }
                }
            )*
        }

        async fn call_every_method(agent: &dyn GuestAgent) {
            $( let _ = agent.$method($($arg),*).await; )*
        }
    };
}

/// `mock.expect_<method>().times(1).returning(|_, ..| Err(<method name>))`.
macro_rules! expect_once {
    ($mock:ident, $method:ident, $($arg:expr),*) => {
        expectation!($mock, $method)
            .times(1)
            .returning(|$(ignore!($arg)),*| {
                Err(Error::Protocol {
                    detail: stringify!($method).into(),
                })
            })
    };
}

/// The mock's `expect_*` method for a typed method.
macro_rules! expectation {
    ($mock:ident, sync) => {
        $mock.expect_sync()
    };
    ($mock:ident, sync_delimited) => {
        $mock.expect_sync_delimited()
    };
    ($mock:ident, ping) => {
        $mock.expect_ping()
    };
    ($mock:ident, time) => {
        $mock.expect_time()
    };
    ($mock:ident, set_time) => {
        $mock.expect_set_time()
    };
    ($mock:ident, info) => {
        $mock.expect_info()
    };
    ($mock:ident, shutdown) => {
        $mock.expect_shutdown()
    };
    ($mock:ident, file_open) => {
        $mock.expect_file_open()
    };
    ($mock:ident, file_close) => {
        $mock.expect_file_close()
    };
    ($mock:ident, file_read) => {
        $mock.expect_file_read()
    };
    ($mock:ident, file_write) => {
        $mock.expect_file_write()
    };
    ($mock:ident, file_seek) => {
        $mock.expect_file_seek()
    };
    ($mock:ident, file_flush) => {
        $mock.expect_file_flush()
    };
    ($mock:ident, fsfreeze_status) => {
        $mock.expect_fsfreeze_status()
    };
    ($mock:ident, fsfreeze_freeze) => {
        $mock.expect_fsfreeze_freeze()
    };
    ($mock:ident, fsfreeze_freeze_list) => {
        $mock.expect_fsfreeze_freeze_list()
    };
    ($mock:ident, fsfreeze_thaw) => {
        $mock.expect_fsfreeze_thaw()
    };
    ($mock:ident, fstrim) => {
        $mock.expect_fstrim()
    };
    ($mock:ident, suspend_disk) => {
        $mock.expect_suspend_disk()
    };
    ($mock:ident, suspend_ram) => {
        $mock.expect_suspend_ram()
    };
    ($mock:ident, suspend_hybrid) => {
        $mock.expect_suspend_hybrid()
    };
    ($mock:ident, network_interfaces) => {
        $mock.expect_network_interfaces()
    };
    ($mock:ident, vcpus) => {
        $mock.expect_vcpus()
    };
    ($mock:ident, set_vcpus) => {
        $mock.expect_set_vcpus()
    };
    ($mock:ident, disks) => {
        $mock.expect_disks()
    };
    ($mock:ident, fsinfo) => {
        $mock.expect_fsinfo()
    };
    ($mock:ident, set_user_password) => {
        $mock.expect_set_user_password()
    };
    ($mock:ident, memory_blocks) => {
        $mock.expect_memory_blocks()
    };
    ($mock:ident, set_memory_blocks) => {
        $mock.expect_set_memory_blocks()
    };
    ($mock:ident, memory_block_info) => {
        $mock.expect_memory_block_info()
    };
    ($mock:ident, exec) => {
        $mock.expect_exec()
    };
    ($mock:ident, exec_status) => {
        $mock.expect_exec_status()
    };
    ($mock:ident, host_name) => {
        $mock.expect_host_name()
    };
    ($mock:ident, users) => {
        $mock.expect_users()
    };
    ($mock:ident, timezone) => {
        $mock.expect_timezone()
    };
    ($mock:ident, osinfo) => {
        $mock.expect_osinfo()
    };
    ($mock:ident, devices) => {
        $mock.expect_devices()
    };
    ($mock:ident, ssh_authorized_keys) => {
        $mock.expect_ssh_authorized_keys()
    };
    ($mock:ident, ssh_add_authorized_keys) => {
        $mock.expect_ssh_add_authorized_keys()
    };
    ($mock:ident, ssh_remove_authorized_keys) => {
        $mock.expect_ssh_remove_authorized_keys()
    };
    ($mock:ident, diskstats) => {
        $mock.expect_diskstats()
    };
    ($mock:ident, cpustats) => {
        $mock.expect_cpustats()
    };
    ($mock:ident, load) => {
        $mock.expect_load()
    };
    ($mock:ident, network_routes) => {
        $mock.expect_network_routes()
    };
}

forwarding_checks! {
    sync(1);
    sync_delimited(1);
    ping();
    time();
    set_time(None);
    info();
    shutdown(None);
    file_open("/x", None);
    file_close(1000);
    file_read(1000, None);
    file_write(1000, vec![1]);
    file_seek(1000, 0, GuestFileWhence::Value(0));
    file_flush(1000);
    fsfreeze_status();
    fsfreeze_freeze();
    fsfreeze_freeze_list(None);
    fsfreeze_thaw();
    fstrim(None);
    suspend_disk();
    suspend_ram();
    suspend_hybrid();
    network_interfaces();
    vcpus();
    set_vcpus(vec![]);
    disks();
    fsinfo();
    set_user_password("u", Password::new("p"), false);
    memory_blocks();
    set_memory_blocks(vec![]);
    memory_block_info();
    exec(GuestExecArgs::new("/bin/true"));
    exec_status(1);
    host_name();
    users();
    timezone();
    osinfo();
    devices();
    ssh_authorized_keys("u");
    ssh_add_authorized_keys("u", vec![], None);
    ssh_remove_authorized_keys("u", vec![]);
    diskstats();
    cpustats();
    load();
    network_routes();
}

/// Records the command names the typed methods send.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

#[async_trait]
impl GuestAgent for Recorder {
    async fn execute_raw(&self, name: &str, _args: Option<Value>) -> qga_proto::Result<Value> {
        self.0.lock().unwrap().push(name.to_owned());
        Err(Error::Protocol {
            detail: "recorder".into(),
        })
    }
}

#[tokio::test]
async fn every_typed_method_forwards_through_box_and_arc() {
    through_pointers().await;
}

#[tokio::test]
async fn the_forwarding_list_covers_every_command() {
    let recorder = Recorder::default();
    call_every_method(&recorder).await;
    let called: BTreeSet<String> = recorder.0.lock().unwrap().iter().cloned().collect();
    let all: BTreeSet<String> = COMMANDS.iter().map(|c| c.name.to_owned()).collect();
    assert_eq!(
        called, all,
        "every command's typed method is listed in forwarding_checks!"
    );
}
