//! Typed data of the events the job helper and most users need. Decode an [`Event`]'s data
//! with [`Event::data_as`]; unknown fields are ignored.

use serde::{Deserialize, Serialize};

use crate::types::{JobStatus, JobType};
#[cfg(doc)]
use crate::wire::Event;

/// `JOB_STATUS_CHANGE` (since 3.0).
pub const JOB_STATUS_CHANGE: &str = "JOB_STATUS_CHANGE";
/// `BLOCK_JOB_COMPLETED`.
pub const BLOCK_JOB_COMPLETED: &str = "BLOCK_JOB_COMPLETED";
/// `BLOCK_JOB_CANCELLED`.
pub const BLOCK_JOB_CANCELLED: &str = "BLOCK_JOB_CANCELLED";
/// `BLOCK_JOB_ERROR`.
pub const BLOCK_JOB_ERROR: &str = "BLOCK_JOB_ERROR";
/// `BLOCK_JOB_READY`.
pub const BLOCK_JOB_READY: &str = "BLOCK_JOB_READY";
/// `BLOCK_JOB_PENDING` (since 2.12).
pub const BLOCK_JOB_PENDING: &str = "BLOCK_JOB_PENDING";
/// `BLOCK_EXPORT_DELETED` (since 5.2).
pub const BLOCK_EXPORT_DELETED: &str = "BLOCK_EXPORT_DELETED";

/// Every job event, for a subscription that follows jobs.
pub const JOB_EVENTS: &[&str] = &[
    JOB_STATUS_CHANGE,
    BLOCK_JOB_COMPLETED,
    BLOCK_JOB_CANCELLED,
    BLOCK_JOB_ERROR,
    BLOCK_JOB_READY,
    BLOCK_JOB_PENDING,
];

/// Data of `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatusChange {
    /// The job.
    pub id: String,
    /// Its new state.
    pub status: JobStatus,
}

/// Data of `BLOCK_JOB_COMPLETED` and `BLOCK_JOB_CANCELLED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobEnded {
    /// The job's kind.
    #[serde(rename = "type")]
    pub kind: JobType,
    /// The job's id.
    pub device: String,
    /// The estimated total bytes.
    pub len: u64,
    /// Bytes done.
    pub offset: u64,
    /// Rate limit.
    pub speed: i64,
    /// The job's error (`BLOCK_JOB_COMPLETED` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Data of `BLOCK_JOB_ERROR`: an I/O error the job met (it may pause or go on, per its
/// error policy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobError {
    /// The job's id.
    pub device: String,
    /// `read` or `write`.
    pub operation: String,
    /// `ignore`, `report` or `stop`.
    pub action: String,
}

/// Data of `BLOCK_JOB_READY` and `BLOCK_JOB_PENDING`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobState {
    /// The job's kind.
    #[serde(rename = "type")]
    pub kind: JobType,
    /// The job's id (`device` in `BLOCK_JOB_READY`, `id` in `BLOCK_JOB_PENDING`).
    #[serde(alias = "device")]
    pub id: String,
}

/// Data of `BLOCK_EXPORT_DELETED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockExportDeleted {
    /// The export's id.
    pub id: String,
}
