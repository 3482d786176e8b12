//! The durable spool between the log intake and the sinks: an append-only log of events in
//! segment files, bounded in bytes, with a delivery cursor.
//!
//! **fsync policy**: an event is acknowledged (the intake answers 202) only after the segment
//! holding it has been `fdatasync`ed. Appends that arrive together share one sync (group
//! commit): one writer thread takes every append queued, writes them, syncs once, then answers
//! them all. So an acknowledged event survives a crash or a restart of the sidecar.
//!
//! **Delivery is at least once**: the cursor (the position up to which every event reached the
//! sink) is written after each delivered batch, by write-and-rename without a sync; after a
//! crash it may be behind, and the events after it are delivered again, with their original
//! `ce-id`. Segments wholly behind the cursor are deleted.
//!
//! Record: `u32 length | u32 crc32 | payload`, little-endian; payload: `u32 header count`, each
//! header `u16 name length | name | u32 value length | value`, then the body. A torn record at
//! the end of the last segment (a crash mid-write, never acknowledged) is cut off at start.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use meshserve_filter_core::logger::{Event, decode_record, encode_record};
use tokio::sync::{mpsc, oneshot, watch};

/// A segment is closed and a new one started past this size (or past a quarter of the spool's
/// bound, if smaller: delivered events leave with their segment, so segments must be small
/// enough for a full spool to free space as it delivers).
const SEGMENT_BYTES: u64 = 16 << 20;
/// The most appends waiting for the writer.
const QUEUE: usize = 4096;
/// No record is larger (the intake takes at most --max-request-bytes per request).
const MAX_RECORD: usize = 1 << 30;
/// The reader reads this much of a segment at once.
const READ_CHUNK: u64 = 1 << 20;

/// Where in the spool: (segment number, byte offset).
pub type Position = (u64, u64);

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the payload spool is full ({0} bytes, --log-spool-max-bytes)")]
    Full(u64),
    #[error("the payload spool failed: {0}")]
    Io(String),
}

#[derive(Debug)]
struct Append {
    events: Vec<Event>,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

/// The appending side (cheap to clone).
#[derive(Debug, Clone)]
pub struct Spool {
    tx: mpsc::Sender<Append>,
    bytes: Arc<AtomicU64>,
    max_bytes: u64,
}

/// The delivering side: reads acknowledged events in order.
#[derive(Debug)]
pub struct Reader {
    dir: PathBuf,
    cursor: Position,
    durable: watch::Receiver<Position>,
    bytes: Arc<AtomicU64>,
    file: Option<(u64, File)>,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.seg"))
}

fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

pub fn encode(event: &Event) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record(event, &mut out);
    out
}

/// Reads the record at the file's position: `Ok(None)` at a clean end or a torn tail.
fn read_record(file: &mut File) -> io::Result<Option<(Event, u64)>> {
    let mut head = [0u8; 8];
    match file.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_RECORD {
        // No record this large was ever written: a torn or corrupt length.
        return Ok(None);
    }
    let mut record = vec![0u8; 8 + len];
    record[..8].copy_from_slice(&head);
    match file.read_exact(&mut record[8..]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    Ok(decode_record(&record).map(|(event, size)| (event, size as u64)))
}

/// The end of the valid records of a segment.
fn valid_end(path: &Path) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let mut end = 0;
    while let Some((_, size)) = read_record(&mut file)? {
        end += size;
    }
    Ok(end)
}

fn read_cursor(dir: &Path) -> Option<Position> {
    let text = std::fs::read_to_string(dir.join("cursor")).ok()?;
    let mut parts = text.split_whitespace();
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Opens (or creates) the spool in `dir`, recovering what a previous run left: the events not
/// yet delivered are read again.
pub fn open(dir: &Path, max_bytes: u64) -> io::Result<(Spool, Reader)> {
    std::fs::create_dir_all(dir)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    // A spool closing in this process lets go within moments (its writer thread ends).
    let mut tries = 0;
    while lock.try_lock().is_err() {
        tries += 1;
        if tries > 20 {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by another meshserve (one spool per sidecar: give each --log-spool its own directory)",
                    dir.display()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut seqs = segments(dir)?;
    if seqs.is_empty() {
        File::create(segment_path(dir, 0))?.sync_all()?;
        seqs.push(0);
    }
    let last = seqs.last().copied().unwrap_or(0);
    let last_path = segment_path(dir, last);
    let end = valid_end(&last_path)?;
    let file = OpenOptions::new().write(true).open(&last_path)?;
    // A torn tail was never acknowledged: cut it off.
    file.set_len(end)?;
    file.sync_all()?;
    let first = seqs.first().copied().unwrap_or(0);
    let cursor = match read_cursor(dir) {
        Some((seq, offset)) if seq >= first && seq <= last => (seq, offset),
        _ => (first, 0),
    };
    let mut total = 0;
    for seq in &seqs {
        total += std::fs::metadata(segment_path(dir, *seq))?.len();
    }
    let bytes = Arc::new(AtomicU64::new(total));
    let (durable_tx, durable) = watch::channel((last, end));
    let (tx, rx) = mpsc::channel(QUEUE);
    let writer = Writer {
        dir: dir.to_owned(),
        segment_bytes: (max_bytes / 4).clamp(1, SEGMENT_BYTES),
        seq: last,
        offset: end,
        file,
        durable: durable_tx,
        _lock: lock,
    };
    std::thread::Builder::new()
        .name("payload-spool".into())
        .spawn(move || writer.run(rx))?;
    Ok((
        Spool {
            tx,
            bytes: Arc::clone(&bytes),
            max_bytes,
        },
        Reader {
            dir: dir.to_owned(),
            cursor,
            durable,
            bytes,
            file: None,
        },
    ))
}

impl Spool {
    /// Appends an event; returns once it is on disk (synced).
    pub async fn append(&self, event: Event) -> Result<(), SpoolError> {
        self.append_all(vec![event]).await
    }

    /// Appends events, all or none; returns once they are on disk (synced).
    pub async fn append_all(&self, events: Vec<Event>) -> Result<(), SpoolError> {
        let size: u64 = events.iter().map(encode_len).sum();
        // Reserved before writing, so concurrent appends cannot overshoot the bound together.
        let before = self.bytes.fetch_add(size, Ordering::Relaxed);
        if before + size > self.max_bytes {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            return Err(SpoolError::Full(self.max_bytes));
        }
        let (done, answer) = oneshot::channel();
        let result = match self.tx.send(Append { events, done }).await {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err(SpoolError::Io("the spool writer stopped".into()))),
            Err(_) => Err(SpoolError::Io("the spool writer stopped".into())),
        };
        if result.is_err() {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
        }
        result
    }

    /// Bytes on disk (undelivered events and delivered ones in segments not yet deleted).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

fn encode_len(event: &Event) -> u64 {
    let headers: usize = event
        .headers
        .iter()
        .map(|(k, v)| 6 + k.len() + v.len())
        .sum();
    (12 + headers + event.body.len()) as u64
}

struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    seq: u64,
    offset: u64,
    file: File,
    durable: watch::Sender<Position>,
    /// Held for the spool's lifetime: one process per spool directory.
    _lock: File,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let result = self.write(&batch);
            for append in batch {
                let answer = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(SpoolError::Io(e.to_string())),
                };
                let _ = append.done.send(answer);
            }
        }
    }

    fn write(&mut self, batch: &[Append]) -> io::Result<()> {
        if self.offset >= self.segment_bytes {
            self.roll()?;
        }
        let mut buffer = Vec::new();
        for event in batch.iter().flat_map(|a| &a.events) {
            encode_record(event, &mut buffer);
        }
        self.file.seek(SeekFrom::Start(self.offset))?;
        if let Err(e) = self
            .file
            .write_all(&buffer)
            .and_then(|()| self.file.sync_data())
        {
            // Leave no half-written records behind the acknowledged ones.
            let _ = self.file.set_len(self.offset);
            return Err(e);
        }
        self.offset += buffer.len() as u64;
        let _ = self.durable.send((self.seq, self.offset));
        Ok(())
    }

    fn roll(&mut self) -> io::Result<()> {
        let next = self.seq + 1;
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(segment_path(&self.dir, next))?;
        file.sync_all()?;
        File::open(&self.dir)?.sync_all()?;
        self.file = file;
        self.seq = next;
        self.offset = 0;
        Ok(())
    }
}

impl Reader {
    /// Up to `max` acknowledged events after the cursor, each with the position after it;
    /// waits until there is at least one.
    pub async fn next_batch(&mut self, max: usize) -> io::Result<Vec<(Position, Event)>> {
        loop {
            let durable = *self.durable.borrow_and_update();
            let batch = self.read_until(durable, max)?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            if self.durable.changed().await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    fn read_until(&mut self, durable: Position, max: usize) -> io::Result<Vec<(Position, Event)>> {
        let mut out = Vec::new();
        let (mut seq, mut offset) = self.cursor;
        while out.len() < max && (seq, offset) < durable {
            if self.file.as_ref().is_none_or(|(s, _)| *s != seq) {
                match File::open(segment_path(&self.dir, seq)) {
                    Ok(f) => self.file = Some((seq, f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound && seq < durable.0 => {
                        (seq, offset) = (seq + 1, 0);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some((_, file)) = self.file.as_mut() else {
                break;
            };
            let end = if seq == durable.0 {
                durable.1
            } else {
                file.metadata()?.len()
            };
            if offset >= end {
                if seq < durable.0 {
                    (seq, offset) = (seq + 1, 0);
                    continue;
                }
                break;
            }
            // One read for many records.
            let mut chunk = vec![0u8; (end - offset).min(READ_CHUNK) as usize];
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut chunk)?;
            let mut at = 0;
            while out.len() < max {
                let Some((event, size)) = chunk.get(at..).and_then(decode_record) else {
                    break;
                };
                at += size;
                offset += size as u64;
                out.push(((seq, offset), event));
            }
            if at == 0 {
                // A record longer than the chunk: read it whole.
                let len = chunk
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, |b| u32::from_le_bytes(b) as u64);
                let whole = 8 + len;
                let decoded = if chunk.len() as u64 >= whole || offset + whole > end {
                    None
                } else {
                    let mut record = vec![0u8; whole as usize];
                    file.seek(SeekFrom::Start(offset))?;
                    file.read_exact(&mut record)?;
                    decode_record(&record)
                };
                match decoded {
                    Some((event, size)) => {
                        offset += size as u64;
                        out.push(((seq, offset), event));
                    }
                    None if !out.is_empty() => break,
                    None => {
                        // Synced records only get here through a disk fault: skip what is
                        // synced of the segment rather than stall delivery for good.
                        tracing::error!(
                            segment = seq,
                            offset,
                            "a corrupt record in the payload spool; skipping to the end of what is synced"
                        );
                        offset = end;
                        self.cursor = (seq, end);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Records that every event up to `position` reached the sink.
    pub fn commit(&mut self, position: Position) -> io::Result<()> {
        self.cursor = position;
        let tmp = self.dir.join("cursor.tmp");
        std::fs::write(&tmp, format!("{} {}\n", position.0, position.1))?;
        std::fs::rename(&tmp, self.dir.join("cursor"))?;
        // Segments wholly behind the cursor go (the writer's current one stays).
        for seq in segments(&self.dir)? {
            if seq >= position.0 {
                break;
            }
            let path = segment_path(&self.dir, seq);
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&path)?;
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            if self.file.as_ref().is_some_and(|(s, _)| *s == seq) {
                self.file = None;
            }
        }
        Ok(())
    }

    pub fn cursor(&self) -> Position {
        self.cursor
    }

    /// Bytes on disk, as [`Spool::bytes`].
    pub fn spooled_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize) -> Event {
        Event {
            headers: vec![
                ("ce-id".into(), format!("id-{i}")),
                ("content-type".into(), "application/json".into()),
            ],
            body: format!("{{\"n\": {i}}}").into_bytes(),
        }
    }

    #[tokio::test]
    async fn acknowledged_events_survive_a_restart_and_delivery_resumes_at_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, mut reader) = open(dir.path(), 1 << 20).unwrap();
            for i in 0..10 {
                spool.append(event(i)).await.unwrap();
            }
            let batch = reader.next_batch(4).await.unwrap();
            assert_eq!(batch.len(), 4);
            reader.commit(batch[3].0).unwrap();
        }
        // A torn record at the end, as a crash mid-write leaves it.
        let seg = segment_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&encode(&event(99))[..20]).unwrap();
        drop(f);
        let (spool, mut reader) = open(dir.path(), 1 << 20).unwrap();
        spool.append(event(10)).await.unwrap();
        let rest = reader.next_batch(100).await.unwrap();
        let ids: Vec<String> = rest
            .iter()
            .map(|(_, e)| e.header("ce-id").unwrap().to_owned())
            .collect();
        assert_eq!(ids, (4..=10).map(|i| format!("id-{i}")).collect::<Vec<_>>());
        assert_eq!(rest[0].1.body, b"{\"n\": 4}");
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_delivered_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, mut reader) = open(dir.path(), 300).unwrap();
        let mut accepted = 0;
        for i in 0..20 {
            match spool.append(event(i)).await {
                Ok(()) => accepted += 1,
                Err(SpoolError::Full(300)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!((2..20).contains(&accepted), "{accepted}");
        let batch = reader.next_batch(100).await.unwrap();
        assert_eq!(batch.len(), accepted);
        reader.commit(batch.last().unwrap().0).unwrap();
        // Delivered, the events' segments go and the spool takes new ones.
        assert!(spool.bytes() < 300, "{}", spool.bytes());
        spool.append(event(100)).await.unwrap();
        let next = reader.next_batch(10).await.unwrap();
        assert_eq!(next[0].1.header("ce-id"), Some("id-100"));
    }

    #[tokio::test]
    async fn one_spool_directory_serves_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _reader) = open(dir.path(), 1 << 20).unwrap();
        let err = open(dir.path(), 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains("in use by another meshserve"),
            "{err}"
        );
        drop(spool);
    }

    #[tokio::test]
    async fn segments_roll_and_are_read_across() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, mut reader) = open(dir.path(), u64::MAX).unwrap();
        let big = Event {
            headers: vec![("ce-id".into(), "big".into())],
            body: vec![7u8; (SEGMENT_BYTES as usize) + 10],
        };
        spool.append(big).await.unwrap();
        spool.append(event(1)).await.unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![0, 1]);
        let batch = reader.next_batch(10).await.unwrap();
        assert_eq!(batch.len(), 2);
        let before = spool.bytes();
        reader.commit(batch[1].0).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![1]);
        assert!(spool.bytes() < before);
    }
}
