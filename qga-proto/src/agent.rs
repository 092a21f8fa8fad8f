//! The [`GuestAgent`] trait: a guest agent as seen by the host.

use async_trait::async_trait;
use serde_json::Value;

use crate::cmd::{self, Command};
use crate::error::{Error, Result};
use crate::session::decode;
use crate::types::*;

/// Runs command `C` through `agent`'s [`GuestAgent::execute_raw`] and decodes the reply.
///
/// The typed methods of [`GuestAgent`] and [`crate::GuestAgentExt::call`] are
/// built on this.
pub async fn call<C, A>(agent: &A, args: &C::Args) -> Result<C::Returns>
where
    C: Command,
    A: GuestAgent + ?Sized,
{
    let args = serde_json::to_value(args).map_err(|source| Error::Encode {
        command: C::NAME.to_owned(),
        source,
    })?;
    let args = match args {
        Value::Null => None,
        other => Some(other),
    };
    let reply = agent.execute_raw(C::NAME, args).await?;
    if !C::SUCCESS_RESPONSE {
        // Nothing comes back on success; the client hands back `{}` or `null`.
        return decode(C::NAME, Value::Object(Default::default()));
    }
    decode(C::NAME, reply)
}

/// Defines [`GuestAgent`] from one list of typed methods, and the impls for `Box<T>` and
/// `Arc<T>` that forward every one of them. A method added to the list is forwarded by
/// construction: a mock behind a pointer never has its expectations bypassed.
///
/// Each method names its receiver (`fn ping(agent) -> ...`): the bodies use that name, never
/// `self`, which async-trait and mockall rewrite with spans of their own. Types are written in
/// brackets (`id: [i64]`, `-> [Result<i64>]`) so that they reach mockall as
/// plain tokens: a `ty` fragment would arrive as an invisible group, which mockall rejects.
macro_rules! guest_agent_trait {
    ($(
        $(#[$meta:meta])*
        fn $name:ident($agent:ident $(, $arg:ident: [$($ty:tt)*])* $(,)?) -> [$($ret:tt)*] { $($body:tt)* }
    )*) => {
        /// A QEMU guest agent, reached over any channel.
        ///
        /// The one required method, [`execute_raw`](GuestAgent::execute_raw), sends a
        /// command and returns its `return` value. Every command of the protocol also
        /// has a typed method with a default implementation on top of it, so the trait
        /// is usable as `dyn GuestAgent` (the facade hands out `Box<dyn GuestAgent>`):
        ///
        /// ```
        /// # #[tokio::main(flavor = "current_thread")]
        /// # async fn main() -> Result<(), qga_proto::Error> {
        /// use qga_proto::GuestAgent;
        ///
        /// let agent: Box<dyn GuestAgent> = Box::new(qga_proto::fake::FakeAgent::linux().connect_async());
        /// let info = agent.info().await?;
        /// assert!(info.is_enabled("guest-get-osinfo"));
        /// println!("{}", agent.osinfo().await?.pretty_name.unwrap_or_default());
        /// # Ok(()) }
        /// ```
        ///
        /// Implementations: [`crate::AsyncClient`] (a real channel, or the fake agent's
        /// in-memory one), `MockGuestAgent` with feature `mock`, and `Box<T>` and
        /// `Arc<T>` of any of them. The pointers forward every method, typed ones
        /// included, so a mock's `expect_osinfo()` holds behind the `Box<dyn GuestAgent>`
        /// the facade hands out.
        ///
        /// Commands that the agent does not answer on success (`guest-shutdown`,
        /// `guest-suspend-*`) return `Ok` once the request went out and no error came
        /// back within a short grace period.
        #[cfg_attr(feature = "mock", mockall::automock)]
        #[async_trait]
        pub trait GuestAgent: Send + Sync {
            /// Sends command `name` with `args` (a JSON object, or `None`) and returns
            /// the agent's `return` value (`{}` for commands that return nothing).
            async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value>;

            $(
                $(#[$meta])*
                async fn $name(&self $(, $arg: $($ty)*)*) -> $($ret)* {
                    let $agent = self;
                    $($body)*
                }
            )*
        }

        #[async_trait]
        impl<T: GuestAgent + ?Sized> GuestAgent for Box<T> {
            async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value> {
                (**self).execute_raw(name, args).await
            }

            $(
                async fn $name(&self $(, $arg: $($ty)*)*) -> $($ret)* {
                    (**self).$name($($arg),*).await
                }
            )*
        }

        #[async_trait]
        impl<T: GuestAgent + ?Sized> GuestAgent for std::sync::Arc<T> {
            async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value> {
                (**self).execute_raw(name, args).await
            }

            $(
                async fn $name(&self $(, $arg: $($ty)*)*) -> $($ret)* {
                    (**self).$name($($arg),*).await
                }
            )*
        }
    };
}

// The mock's expectation types come out of this module without `Debug`.
#[cfg_attr(feature = "mock", allow(missing_debug_implementations))]
mod definition {
    use super::*;

    guest_agent_trait! {
        /// `guest-sync`: the agent echoes `id`.
        fn sync(agent, id: [i64]) -> [Result<i64>] {
            call::<cmd::GuestSync, _>(agent, &cmd::GuestSyncArgs { id }).await
        }

        /// `guest-sync-delimited`: the agent echoes `id` after a 0xFF sentinel.
        fn sync_delimited(agent, id: [i64]) -> [Result<i64>] {
            call::<cmd::GuestSyncDelimited, _>(agent, &cmd::GuestSyncArgs { id }).await
        }

        /// `guest-ping`.
        fn ping(agent) -> [Result<()>] {
            call::<cmd::GuestPing, _>(agent, &()).await.map(drop)
        }

        /// `guest-get-time`: guest system time in ns since the epoch.
        fn time(agent) -> [Result<i64>] {
            call::<cmd::GuestGetTime, _>(agent, &()).await
        }

        /// `guest-set-time`: sets the time (ns since the epoch), or from the RTC when `None`.
        fn set_time(agent, time_ns: [Option<i64>]) -> [Result<()>] {
            call::<cmd::GuestSetTime, _>(agent, &cmd::GuestSetTimeArgs { time: time_ns })
                .await
                .map(drop)
        }

        /// `guest-info`: version and command list.
        fn info(agent) -> [Result<GuestAgentInfo>] {
            call::<cmd::GuestInfo, _>(agent, &()).await
        }

        /// `guest-shutdown` (no reply on success).
        fn shutdown(agent, mode: [Option<GuestShutdownMode>]) -> [Result<()>] {
            call::<cmd::GuestShutdown, _>(agent, &cmd::GuestShutdownArgs { mode })
                .await
                .map(drop)
        }

        /// `guest-file-open`: returns a handle.
        fn file_open(agent, path: [&str], mode: [Option<String>]) -> [Result<i64>] {
            call::<cmd::GuestFileOpen, _>(
                agent,
                &cmd::GuestFileOpenArgs {
                    path: path.to_owned(),
                    mode,
                },
            )
            .await
        }

        /// `guest-file-close`.
        fn file_close(agent, handle: [i64]) -> [Result<()>] {
            call::<cmd::GuestFileClose, _>(agent, &cmd::GuestFileHandleArgs { handle })
                .await
                .map(drop)
        }

        /// `guest-file-read`: at most `count` bytes (agent default 4 KiB).
        fn file_read(agent, handle: [i64], count: [Option<i64>]) -> [Result<GuestFileRead>] {
            call::<cmd::GuestFileRead, _>(agent, &cmd::GuestFileReadArgs { handle, count }).await
        }

        /// `guest-file-write`.
        fn file_write(agent, handle: [i64], data: [Vec<u8>]) -> [Result<GuestFileWrite>] {
            let args = cmd::GuestFileWriteArgs {
                handle,
                buf_b64: Base64Data(data),
                count: None,
            };
            call::<cmd::GuestFileWrite, _>(agent, &args).await
        }

        /// `guest-file-seek`.
        fn file_seek(agent, handle: [i64], offset: [i64], whence: [GuestFileWhence]) -> [Result<GuestFileSeek>] {
            call::<cmd::GuestFileSeek, _>(
                agent,
                &cmd::GuestFileSeekArgs {
                    handle,
                    offset,
                    whence,
                },
            )
            .await
        }

        /// `guest-file-flush`.
        fn file_flush(agent, handle: [i64]) -> [Result<()>] {
            call::<cmd::GuestFileFlush, _>(agent, &cmd::GuestFileHandleArgs { handle })
                .await
                .map(drop)
        }

        /// `guest-fsfreeze-status`.
        fn fsfreeze_status(agent) -> [Result<GuestFsfreezeStatus>] {
            call::<cmd::GuestFsfreezeStatus, _>(agent, &()).await
        }

        /// `guest-fsfreeze-freeze`: returns the number of filesystems frozen.
        /// Prefer [`crate::freeze_filesystems`], which thaws on drop.
        fn fsfreeze_freeze(agent) -> [Result<i64>] {
            call::<cmd::GuestFsfreezeFreeze, _>(agent, &()).await
        }

        /// `guest-fsfreeze-freeze-list`.
        fn fsfreeze_freeze_list(agent, mountpoints: [Option<Vec<String>>]) -> [Result<i64>] {
            call::<cmd::GuestFsfreezeFreezeList, _>(
                agent,
                &cmd::GuestFsfreezeFreezeListArgs { mountpoints },
            )
            .await
        }

        /// `guest-fsfreeze-thaw`: returns the number of filesystems thawed.
        fn fsfreeze_thaw(agent) -> [Result<i64>] {
            call::<cmd::GuestFsfreezeThaw, _>(agent, &()).await
        }

        /// `guest-fstrim`.
        fn fstrim(agent, minimum: [Option<i64>]) -> [Result<GuestFilesystemTrimResponse>] {
            call::<cmd::GuestFstrim, _>(agent, &cmd::GuestFstrimArgs { minimum }).await
        }

        /// `guest-suspend-disk` (no reply on success).
        fn suspend_disk(agent) -> [Result<()>] {
            call::<cmd::GuestSuspendDisk, _>(agent, &()).await.map(drop)
        }

        /// `guest-suspend-ram` (no reply on success).
        fn suspend_ram(agent) -> [Result<()>] {
            call::<cmd::GuestSuspendRam, _>(agent, &()).await.map(drop)
        }

        /// `guest-suspend-hybrid` (no reply on success).
        fn suspend_hybrid(agent) -> [Result<()>] {
            call::<cmd::GuestSuspendHybrid, _>(agent, &())
                .await
                .map(drop)
        }

        /// `guest-network-get-interfaces`.
        fn network_interfaces(agent) -> [Result<Vec<GuestNetworkInterface>>] {
            call::<cmd::GuestNetworkGetInterfaces, _>(agent, &()).await
        }

        /// `guest-get-vcpus`.
        fn vcpus(agent) -> [Result<Vec<GuestLogicalProcessor>>] {
            call::<cmd::GuestGetVcpus, _>(agent, &()).await
        }

        /// `guest-set-vcpus`: returns how many leading entries were applied.
        fn set_vcpus(agent, vcpus: [Vec<GuestLogicalProcessor>]) -> [Result<i64>] {
            call::<cmd::GuestSetVcpus, _>(agent, &cmd::GuestSetVcpusArgs { vcpus }).await
        }

        /// `guest-get-disks`.
        fn disks(agent) -> [Result<Vec<GuestDiskInfo>>] {
            call::<cmd::GuestGetDisks, _>(agent, &()).await
        }

        /// `guest-get-fsinfo`.
        fn fsinfo(agent) -> [Result<Vec<GuestFilesystemInfo>>] {
            call::<cmd::GuestGetFsinfo, _>(agent, &()).await
        }

        /// `guest-set-user-password`.
        fn set_user_password(agent, username: [&str], password: [Password], crypted: [bool]) -> [Result<()>] {
            let args = cmd::GuestSetUserPasswordArgs {
                username: username.to_owned(),
                password,
                crypted,
            };
            call::<cmd::GuestSetUserPassword, _>(agent, &args)
                .await
                .map(drop)
        }

        /// `guest-get-memory-blocks`.
        fn memory_blocks(agent) -> [Result<Vec<GuestMemoryBlock>>] {
            call::<cmd::GuestGetMemoryBlocks, _>(agent, &()).await
        }

        /// `guest-set-memory-blocks`.
        fn set_memory_blocks(agent, mem_blks: [Vec<GuestMemoryBlock>]) -> [Result<Vec<GuestMemoryBlockResponse>>] {
            call::<cmd::GuestSetMemoryBlocks, _>(agent, &cmd::GuestSetMemoryBlocksArgs { mem_blks })
                .await
        }

        /// `guest-get-memory-block-info`.
        fn memory_block_info(agent) -> [Result<GuestMemoryBlockInfo>] {
            call::<cmd::GuestGetMemoryBlockInfo, _>(agent, &()).await
        }

        /// `guest-exec`: starts a process; see [`crate::GuestAgentExt::exec_wait`]
        /// to wait for it and collect its output.
        fn exec(agent, args: [cmd::GuestExecArgs]) -> [Result<GuestExec>] {
            call::<cmd::GuestExec, _>(agent, &args).await
        }

        /// `guest-exec-status`. The first report with `exited: true` is the last:
        /// the agent forgets the process afterwards.
        fn exec_status(agent, pid: [i64]) -> [Result<GuestExecStatus>] {
            call::<cmd::GuestExecStatus, _>(agent, &cmd::GuestExecStatusArgs { pid }).await
        }

        /// `guest-get-host-name`.
        fn host_name(agent) -> [Result<GuestHostName>] {
            call::<cmd::GuestGetHostName, _>(agent, &()).await
        }

        /// `guest-get-users`.
        fn users(agent) -> [Result<Vec<GuestUser>>] {
            call::<cmd::GuestGetUsers, _>(agent, &()).await
        }

        /// `guest-get-timezone`.
        fn timezone(agent) -> [Result<GuestTimezone>] {
            call::<cmd::GuestGetTimezone, _>(agent, &()).await
        }

        /// `guest-get-osinfo`.
        fn osinfo(agent) -> [Result<GuestOSInfo>] {
            call::<cmd::GuestGetOsinfo, _>(agent, &()).await
        }

        /// `guest-get-devices` (Windows guests).
        fn devices(agent) -> [Result<Vec<GuestDeviceInfo>>] {
            call::<cmd::GuestGetDevices, _>(agent, &()).await
        }

        /// `guest-ssh-get-authorized-keys`.
        fn ssh_authorized_keys(agent, username: [&str]) -> [Result<GuestAuthorizedKeys>] {
            let args = cmd::GuestSshGetAuthorizedKeysArgs {
                username: username.to_owned(),
            };
            call::<cmd::GuestSshGetAuthorizedKeys, _>(agent, &args).await
        }

        /// `guest-ssh-add-authorized-keys`.
        fn ssh_add_authorized_keys(agent, username: [&str], keys: [Vec<String>], reset: [Option<bool>]) -> [Result<()>] {
            let args = cmd::GuestSshAddAuthorizedKeysArgs {
                username: username.to_owned(),
                keys,
                reset,
            };
            call::<cmd::GuestSshAddAuthorizedKeys, _>(agent, &args)
                .await
                .map(drop)
        }

        /// `guest-ssh-remove-authorized-keys`.
        fn ssh_remove_authorized_keys(agent, username: [&str], keys: [Vec<String>]) -> [Result<()>] {
            let args = cmd::GuestSshRemoveAuthorizedKeysArgs {
                username: username.to_owned(),
                keys,
            };
            call::<cmd::GuestSshRemoveAuthorizedKeys, _>(agent, &args)
                .await
                .map(drop)
        }

        /// `guest-get-diskstats`.
        fn diskstats(agent) -> [Result<Vec<GuestDiskStatsInfo>>] {
            call::<cmd::GuestGetDiskstats, _>(agent, &()).await
        }

        /// `guest-get-cpustats`.
        fn cpustats(agent) -> [Result<Vec<GuestCpuStats>>] {
            call::<cmd::GuestGetCpustats, _>(agent, &()).await
        }

        /// `guest-get-load` (agents 10.0 and later).
        fn load(agent) -> [Result<GuestLoadAverage>] {
            call::<cmd::GuestGetLoad, _>(agent, &()).await
        }

        /// `guest-network-get-route` (agents 9.1 and later).
        fn network_routes(agent) -> [Result<Vec<GuestNetworkRoute>>] {
            call::<cmd::GuestNetworkGetRoute, _>(agent, &()).await
        }
    }
}

pub use definition::GuestAgent;
#[cfg(feature = "mock")]
pub use definition::MockGuestAgent;
