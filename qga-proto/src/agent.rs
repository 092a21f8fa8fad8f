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
/// in-memory one), `MockGuestAgent` with feature `mock`.
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

    /// `guest-sync`: the agent echoes `id`.
    async fn sync(&self, id: i64) -> Result<i64> {
        call::<cmd::GuestSync, _>(self, &cmd::GuestSyncArgs { id }).await
    }

    /// `guest-sync-delimited`: the agent echoes `id` after a 0xFF sentinel.
    async fn sync_delimited(&self, id: i64) -> Result<i64> {
        call::<cmd::GuestSyncDelimited, _>(self, &cmd::GuestSyncArgs { id }).await
    }

    /// `guest-ping`.
    async fn ping(&self) -> Result<()> {
        call::<cmd::GuestPing, _>(self, &()).await.map(drop)
    }

    /// `guest-get-time`: guest system time in ns since the epoch.
    async fn time(&self) -> Result<i64> {
        call::<cmd::GuestGetTime, _>(self, &()).await
    }

    /// `guest-set-time`: sets the time (ns since the epoch), or from the RTC when `None`.
    async fn set_time(&self, time_ns: Option<i64>) -> Result<()> {
        call::<cmd::GuestSetTime, _>(self, &cmd::GuestSetTimeArgs { time: time_ns })
            .await
            .map(drop)
    }

    /// `guest-info`: version and command list.
    async fn info(&self) -> Result<GuestAgentInfo> {
        call::<cmd::GuestInfo, _>(self, &()).await
    }

    /// `guest-shutdown` (no reply on success).
    async fn shutdown(&self, mode: Option<GuestShutdownMode>) -> Result<()> {
        call::<cmd::GuestShutdown, _>(self, &cmd::GuestShutdownArgs { mode })
            .await
            .map(drop)
    }

    /// `guest-file-open`: returns a handle.
    async fn file_open(&self, path: &str, mode: Option<String>) -> Result<i64> {
        call::<cmd::GuestFileOpen, _>(
            self,
            &cmd::GuestFileOpenArgs {
                path: path.to_owned(),
                mode,
            },
        )
        .await
    }

    /// `guest-file-close`.
    async fn file_close(&self, handle: i64) -> Result<()> {
        call::<cmd::GuestFileClose, _>(self, &cmd::GuestFileHandleArgs { handle })
            .await
            .map(drop)
    }

    /// `guest-file-read`: at most `count` bytes (agent default 4 KiB).
    async fn file_read(&self, handle: i64, count: Option<i64>) -> Result<GuestFileRead> {
        call::<cmd::GuestFileRead, _>(self, &cmd::GuestFileReadArgs { handle, count }).await
    }

    /// `guest-file-write`.
    async fn file_write(&self, handle: i64, data: Vec<u8>) -> Result<GuestFileWrite> {
        let args = cmd::GuestFileWriteArgs {
            handle,
            buf_b64: Base64Data(data),
            count: None,
        };
        call::<cmd::GuestFileWrite, _>(self, &args).await
    }

    /// `guest-file-seek`.
    async fn file_seek(
        &self,
        handle: i64,
        offset: i64,
        whence: GuestFileWhence,
    ) -> Result<GuestFileSeek> {
        call::<cmd::GuestFileSeek, _>(
            self,
            &cmd::GuestFileSeekArgs {
                handle,
                offset,
                whence,
            },
        )
        .await
    }

    /// `guest-file-flush`.
    async fn file_flush(&self, handle: i64) -> Result<()> {
        call::<cmd::GuestFileFlush, _>(self, &cmd::GuestFileHandleArgs { handle })
            .await
            .map(drop)
    }

    /// `guest-fsfreeze-status`.
    async fn fsfreeze_status(&self) -> Result<GuestFsfreezeStatus> {
        call::<cmd::GuestFsfreezeStatus, _>(self, &()).await
    }

    /// `guest-fsfreeze-freeze`: returns the number of filesystems frozen.
    /// Prefer [`crate::freeze_filesystems`], which thaws on drop.
    async fn fsfreeze_freeze(&self) -> Result<i64> {
        call::<cmd::GuestFsfreezeFreeze, _>(self, &()).await
    }

    /// `guest-fsfreeze-freeze-list`.
    async fn fsfreeze_freeze_list(&self, mountpoints: Option<Vec<String>>) -> Result<i64> {
        call::<cmd::GuestFsfreezeFreezeList, _>(
            self,
            &cmd::GuestFsfreezeFreezeListArgs { mountpoints },
        )
        .await
    }

    /// `guest-fsfreeze-thaw`: returns the number of filesystems thawed.
    async fn fsfreeze_thaw(&self) -> Result<i64> {
        call::<cmd::GuestFsfreezeThaw, _>(self, &()).await
    }

    /// `guest-fstrim`.
    async fn fstrim(&self, minimum: Option<i64>) -> Result<GuestFilesystemTrimResponse> {
        call::<cmd::GuestFstrim, _>(self, &cmd::GuestFstrimArgs { minimum }).await
    }

    /// `guest-suspend-disk` (no reply on success).
    async fn suspend_disk(&self) -> Result<()> {
        call::<cmd::GuestSuspendDisk, _>(self, &()).await.map(drop)
    }

    /// `guest-suspend-ram` (no reply on success).
    async fn suspend_ram(&self) -> Result<()> {
        call::<cmd::GuestSuspendRam, _>(self, &()).await.map(drop)
    }

    /// `guest-suspend-hybrid` (no reply on success).
    async fn suspend_hybrid(&self) -> Result<()> {
        call::<cmd::GuestSuspendHybrid, _>(self, &())
            .await
            .map(drop)
    }

    /// `guest-network-get-interfaces`.
    async fn network_interfaces(&self) -> Result<Vec<GuestNetworkInterface>> {
        call::<cmd::GuestNetworkGetInterfaces, _>(self, &()).await
    }

    /// `guest-get-vcpus`.
    async fn vcpus(&self) -> Result<Vec<GuestLogicalProcessor>> {
        call::<cmd::GuestGetVcpus, _>(self, &()).await
    }

    /// `guest-set-vcpus`: returns how many leading entries were applied.
    async fn set_vcpus(&self, vcpus: Vec<GuestLogicalProcessor>) -> Result<i64> {
        call::<cmd::GuestSetVcpus, _>(self, &cmd::GuestSetVcpusArgs { vcpus }).await
    }

    /// `guest-get-disks`.
    async fn disks(&self) -> Result<Vec<GuestDiskInfo>> {
        call::<cmd::GuestGetDisks, _>(self, &()).await
    }

    /// `guest-get-fsinfo`.
    async fn fsinfo(&self) -> Result<Vec<GuestFilesystemInfo>> {
        call::<cmd::GuestGetFsinfo, _>(self, &()).await
    }

    /// `guest-set-user-password`.
    async fn set_user_password(
        &self,
        username: &str,
        password: Password,
        crypted: bool,
    ) -> Result<()> {
        let args = cmd::GuestSetUserPasswordArgs {
            username: username.to_owned(),
            password,
            crypted,
        };
        call::<cmd::GuestSetUserPassword, _>(self, &args)
            .await
            .map(drop)
    }

    /// `guest-get-memory-blocks`.
    async fn memory_blocks(&self) -> Result<Vec<GuestMemoryBlock>> {
        call::<cmd::GuestGetMemoryBlocks, _>(self, &()).await
    }

    /// `guest-set-memory-blocks`.
    async fn set_memory_blocks(
        &self,
        mem_blks: Vec<GuestMemoryBlock>,
    ) -> Result<Vec<GuestMemoryBlockResponse>> {
        call::<cmd::GuestSetMemoryBlocks, _>(self, &cmd::GuestSetMemoryBlocksArgs { mem_blks })
            .await
    }

    /// `guest-get-memory-block-info`.
    async fn memory_block_info(&self) -> Result<GuestMemoryBlockInfo> {
        call::<cmd::GuestGetMemoryBlockInfo, _>(self, &()).await
    }

    /// `guest-exec`: starts a process; see [`crate::GuestAgentExt::exec_wait`]
    /// to wait for it and collect its output.
    async fn exec(&self, args: cmd::GuestExecArgs) -> Result<GuestExec> {
        call::<cmd::GuestExec, _>(self, &args).await
    }

    /// `guest-exec-status`. The first report with `exited: true` is the last:
    /// the agent forgets the process afterwards.
    async fn exec_status(&self, pid: i64) -> Result<GuestExecStatus> {
        call::<cmd::GuestExecStatus, _>(self, &cmd::GuestExecStatusArgs { pid }).await
    }

    /// `guest-get-host-name`.
    async fn host_name(&self) -> Result<GuestHostName> {
        call::<cmd::GuestGetHostName, _>(self, &()).await
    }

    /// `guest-get-users`.
    async fn users(&self) -> Result<Vec<GuestUser>> {
        call::<cmd::GuestGetUsers, _>(self, &()).await
    }

    /// `guest-get-timezone`.
    async fn timezone(&self) -> Result<GuestTimezone> {
        call::<cmd::GuestGetTimezone, _>(self, &()).await
    }

    /// `guest-get-osinfo`.
    async fn osinfo(&self) -> Result<GuestOSInfo> {
        call::<cmd::GuestGetOsinfo, _>(self, &()).await
    }

    /// `guest-get-devices` (Windows guests).
    async fn devices(&self) -> Result<Vec<GuestDeviceInfo>> {
        call::<cmd::GuestGetDevices, _>(self, &()).await
    }

    /// `guest-ssh-get-authorized-keys`.
    async fn ssh_authorized_keys(&self, username: &str) -> Result<GuestAuthorizedKeys> {
        let args = cmd::GuestSshGetAuthorizedKeysArgs {
            username: username.to_owned(),
        };
        call::<cmd::GuestSshGetAuthorizedKeys, _>(self, &args).await
    }

    /// `guest-ssh-add-authorized-keys`.
    async fn ssh_add_authorized_keys(
        &self,
        username: &str,
        keys: Vec<String>,
        reset: Option<bool>,
    ) -> Result<()> {
        let args = cmd::GuestSshAddAuthorizedKeysArgs {
            username: username.to_owned(),
            keys,
            reset,
        };
        call::<cmd::GuestSshAddAuthorizedKeys, _>(self, &args)
            .await
            .map(drop)
    }

    /// `guest-ssh-remove-authorized-keys`.
    async fn ssh_remove_authorized_keys(&self, username: &str, keys: Vec<String>) -> Result<()> {
        let args = cmd::GuestSshRemoveAuthorizedKeysArgs {
            username: username.to_owned(),
            keys,
        };
        call::<cmd::GuestSshRemoveAuthorizedKeys, _>(self, &args)
            .await
            .map(drop)
    }

    /// `guest-get-diskstats`.
    async fn diskstats(&self) -> Result<Vec<GuestDiskStatsInfo>> {
        call::<cmd::GuestGetDiskstats, _>(self, &()).await
    }

    /// `guest-get-cpustats`.
    async fn cpustats(&self) -> Result<Vec<GuestCpuStats>> {
        call::<cmd::GuestGetCpustats, _>(self, &()).await
    }

    /// `guest-get-load` (agents 10.0 and later).
    async fn load(&self) -> Result<GuestLoadAverage> {
        call::<cmd::GuestGetLoad, _>(self, &()).await
    }

    /// `guest-network-get-route` (agents 9.1 and later).
    async fn network_routes(&self) -> Result<Vec<GuestNetworkRoute>> {
        call::<cmd::GuestNetworkGetRoute, _>(self, &()).await
    }
}

#[async_trait]
impl<T: GuestAgent + ?Sized> GuestAgent for Box<T> {
    async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value> {
        (**self).execute_raw(name, args).await
    }
}

#[async_trait]
impl<T: GuestAgent + ?Sized> GuestAgent for std::sync::Arc<T> {
    async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value> {
        (**self).execute_raw(name, args).await
    }
}
