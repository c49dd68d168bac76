//! The audit trail: each record's final outcome (sent, dead, duplicate), once, as a JSON line
//! appended to `audit.file` and/or as a log event (`audit.log`), for reconciliation
//! (docs/reconciliation.md).
//!
//! The ledger stays the source of truth; the file is an export. After each batch of lines
//! the file is fsynced. What the file already holds is read back when the trail opens (a
//! torn last line from a crash is cut off first), so a record whose outcome became final in
//! the ledger just before a kill -9 is written at the next start, and none twice. Log events
//! are at least once: one emitted just before a crash is emitted again. Each line carries
//! `record_key` (the record's ClientToken: product, dimension, hour and ledger instance), unique
//! per record.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::clock::rfc3339;
use crate::config::AuditConfig;
use crate::ledger::{Ledger, LedgerError};
use crate::model::StoredRecord;

/// How often the trail looks for newly final records while the agent runs.
pub const EXPORT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

pub struct AuditTrail {
    file: Option<PathBuf>,
    log: bool,
    ledger: Ledger,
    /// `record_key`s already exported.
    written: HashSet<String>,
}

impl AuditTrail {
    /// `None` when neither a file nor log events are configured.
    pub fn open(config: &AuditConfig, ledger: Ledger) -> Result<Option<Self>, AuditError> {
        let file = (!config.file.is_empty()).then(|| PathBuf::from(&config.file));
        if file.is_none() && !config.log {
            return Ok(None);
        }
        let written = match &file {
            Some(path) => read_keys(path).map_err(|source| AuditError::File {
                path: path.display().to_string(),
                source,
            })?,
            None => HashSet::new(),
        };
        Ok(Some(Self {
            file,
            log: config.log,
            ledger,
            written,
        }))
    }

    /// Writes every final record not yet exported; returns how many.
    pub async fn export(&mut self) -> Result<usize, AuditError> {
        let fresh: Vec<StoredRecord> = self
            .ledger
            .final_records()
            .await?
            .into_iter()
            .filter(|r| !self.written.contains(&r.client_token))
            .collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        let product_code = self.ledger.identity().product_code.clone();
        let lines: Vec<String> = fresh.iter().map(|r| line(r, &product_code)).collect();
        if let Some(path) = &self.file {
            append(path, &lines).map_err(|source| AuditError::File {
                path: path.display().to_string(),
                source,
            })?;
        }
        for (record, text) in fresh.iter().zip(&lines) {
            if self.log {
                tracing::info!(
                    target: "meterd::audit",
                    record_key = %record.client_token,
                    hour = %rfc3339(record.hour),
                    dimension = %record.dimension,
                    quantity = record.quantity,
                    state = ?record.state,
                    metering_record_id = record.metering_record_id.as_deref().unwrap_or(""),
                    attempts = record.attempts,
                    audit = %text,
                    "record final"
                );
            }
            self.written.insert(record.client_token.clone());
        }
        Ok(fresh.len())
    }

    /// Exports every [`EXPORT_INTERVAL`] until stopped; failures are logged and retried.
    pub async fn run(mut self, stop: CancellationToken) -> Self {
        let mut failing = false;
        loop {
            match self.export().await {
                Ok(_) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!(error = %e, "the audit trail cannot be written; it catches up when it can (the ledger keeps every record)");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return self,
                _ = tokio::time::sleep(EXPORT_INTERVAL) => {}
            }
        }
    }
}

/// One record's final outcome as a JSON line.
pub fn line(r: &StoredRecord, product_code: &str) -> String {
    json!({
        "record_key": r.client_token,
        "product_code": product_code,
        "hour": rfc3339(r.hour),
        "dimension": r.dimension,
        "quantity": r.quantity,
        "allocations": r.allocations,
        "timestamp": rfc3339(r.timestamp),
        "state": r.state,
        "metering_record_id": r.metering_record_id,
        "error": if r.metering_record_id.is_some() { None } else { r.last_error.as_deref() },
        "attempts": r.attempts,
        "sealed_at": rfc3339(r.sealed_at),
        "final_at": rfc3339(r.updated_at),
    })
    .to_string()
}

/// The keys the file holds, after cutting off a torn last line (a crash mid-write).
fn read_keys(path: &Path) -> std::io::Result<HashSet<String>> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            let keep = last_newline_end(&mut file, len)?;
            tracing::warn!(path = %path.display(), cut = len - keep, "audit file ends in a torn line (a crash mid-write); cutting it off, the record is written again");
            file.set_len(keep)?;
            file.sync_all()?;
        }
    }
    file.seek(SeekFrom::Start(0))?;
    let mut keys = HashSet::new();
    for text in BufReader::new(file).lines() {
        let text = text?;
        let key = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["record_key"].as_str().map(str::to_owned));
        if let Some(key) = key {
            keys.insert(key);
        }
    }
    Ok(keys)
}

/// The length of the file up to and including its last newline (0 if it has none).
fn last_newline_end(file: &mut File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn append(path: &Path, lines: &[String]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let created = !path.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    if created {
        // The new file's name must survive a crash too.
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
    }
    let mut text = String::new();
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    file.write_all(text.as_bytes())?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_off_and_whole_lines_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        std::fs::write(
            &path,
            "{\"record_key\":\"a\"}\n{\"record_key\":\"b\"}\n{\"record_key\":\"c\",\"quan",
        )
        .expect("write");
        let keys = read_keys(&path).expect("keys");
        assert_eq!(
            keys,
            HashSet::from(["a".to_owned(), "b".to_owned()]),
            "the torn record is not counted as written"
        );
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "{\"record_key\":\"a\"}\n{\"record_key\":\"b\"}\n"
        );
        std::fs::write(&path, "no newline at all").expect("write");
        assert!(read_keys(&path).expect("keys").is_empty());
        assert_eq!(std::fs::read(&path).expect("read"), b"");
        assert!(read_keys(&dir.path().join("absent"))
            .expect("keys")
            .is_empty());
    }
}
