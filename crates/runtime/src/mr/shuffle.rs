//! The shuffle's servers and fetchers (paper §3.1) over TCP or TLS: a worker serves the
//! output of its completed attempts from its [`FileTable`] ([`serve_shuffle`]); reduce
//! attempts and the coordinator fetch files from it ([`fetch_file`]); the coordinator serves
//! job inputs to workers that cannot open them ([`serve_input_request`], [`fetch_input`]).
//!
//! One connection per file: `Hello` (role `Shuffle`, cluster id = job id), one
//! [`ShuffleRequest`], then [`ShuffleReply::Data`] chunks and an `End` carrying the file's
//! length. Every frame carries a CRC32C; the fetcher writes to a temporary name and renames it
//! only once the length matches, so a half-fetched file is never used. What may be served and
//! the checks on each request are `shoal_mr::shuffle`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use shoal_mr::shuffle::{shuffle_hello_refusal, Fetched, FileTable, InputFiles};
use shoal_wire::codec::{CodecError, FrameCodec};
use shoal_wire::mr::{
    FileKey, ShuffleReply, ShuffleRequest, SHUFFLE_CHUNK_BYTES, SHUFFLE_MAX_FRAME_BYTES,
};
use shoal_wire::{Hello, Role};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

use super::net::{Security, Stream};

/// How long a fetcher waits to connect to a shuffle server.
pub const SHUFFLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long either side waits for the next frame (at most one chunk) before giving up on a
/// connection: a stopped or partitioned server is detected this fast.
pub const SHUFFLE_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Most shuffle connections a worker serves at once; more wait in the accept queue.
pub const MAX_SHUFFLE_CONNECTIONS: usize = 64;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum ShuffleError {
    /// Could not connect.
    #[error("cannot connect to shuffle server {addr}: {source}")]
    Connect {
        /// The server.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// The connection failed.
    #[error("shuffle I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Writing the fetched file on this side failed (a full or read-only disk: see
    /// `shoal_mr::disk`).
    #[error("cannot write {}: {}", path.display(), shoal_mr::disk::reason(error))]
    LocalWrite {
        /// The file being written.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// A bad frame.
    #[error("shuffle protocol error: {0}")]
    Codec(#[from] CodecError),
    /// The server refused or could not read the file.
    #[error("shuffle server refused: {0}")]
    Remote(String),
    /// The connection ended before the file did.
    #[error("shuffle connection closed early after {0} bytes")]
    Truncated(u64),
    /// The server announced a length different from what arrived.
    #[error("shuffle length mismatch: got {got} bytes, server says {expected}")]
    Length {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// Nothing arrived for [`SHUFFLE_IO_TIMEOUT`].
    #[error("shuffle server stalled")]
    Timeout,
}

/// Serves files from `table` on `listener` forever (drop the task to stop), through
/// `security` (a TLS server refuses callers without a certificate of its CA).
pub async fn serve_shuffle(listener: TcpListener, table: FileTable, security: Security) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_SHUFFLE_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "shuffle: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let table = table.clone();
        let security = security.clone();
        tokio::spawn(async move {
            let Some(accepted) = super::net::accept(
                &security,
                stream,
                SHUFFLE_IO_TIMEOUT,
                "worker's shuffle server",
            )
            .await
            else {
                return;
            };
            if let Err(e) = serve_one(accepted.stream, accepted.refusal, &table).await {
                tracing::debug!(%peer, error = %e, "shuffle connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn next_frame<S, T>(framed: &mut S) -> Result<T, ShuffleError>
where
    S: futures::Stream<Item = Result<T, CodecError>> + Unpin,
{
    match tokio::time::timeout(SHUFFLE_IO_TIMEOUT, framed.next()).await {
        Err(_) => Err(ShuffleError::Timeout),
        Ok(None) => Err(ShuffleError::Truncated(0)),
        Ok(Some(r)) => Ok(r?),
    }
}

async fn serve_one(
    stream: Stream,
    refusal: Option<String>,
    table: &FileTable,
) -> Result<(), ShuffleError> {
    let mut framed = Framed::new(
        stream,
        FrameCodec::<Hello, ShuffleReply>::new(SHUFFLE_MAX_FRAME_BYTES),
    );
    let hello = next_frame(&mut framed).await?;
    let job_id = table.job_id();
    if let Some(reason) = refusal {
        tracing::warn!(%reason, "shuffle fetch refused");
        framed.send(ShuffleReply::Error(reason.clone())).await?;
        return Err(ShuffleError::Remote(reason));
    }
    if let Some(reason) = shuffle_hello_refusal(&hello, job_id, "worker") {
        framed.send(ShuffleReply::Error(reason.clone())).await?;
        return Err(ShuffleError::Remote(reason));
    }
    let mut framed = framed
        .map_codec(|_| FrameCodec::<ShuffleRequest, ShuffleReply>::new(SHUFFLE_MAX_FRAME_BYTES));
    let key = match next_frame(&mut framed).await? {
        ShuffleRequest::Fetch(key) => key,
        ShuffleRequest::FetchInput { path, .. } => {
            let reason = format!(
                "a worker serves no job inputs (asked for {}): fetch inputs from the coordinator",
                path.display()
            );
            framed.send(ShuffleReply::Error(reason.clone())).await?;
            return Err(ShuffleError::Remote(reason));
        }
    };
    let Some((path, once)) = table.take_for_serving(&key) else {
        framed
            .send(ShuffleReply::Error(format!("no such file: {key:?}")))
            .await?;
        return Ok(());
    };
    let result = send_file(&mut framed, &path).await;
    if let Some(dir) = once {
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
    result
}

/// Answers one [`ShuffleRequest`] on a connection whose handshake the caller accepted: a
/// `FetchInput` of a job input is sent in [`SHUFFLE_CHUNK_BYTES`] chunks and an `End`; a
/// path that is not a job input, a range beyond the file, a file changed since the job was
/// planned, or a `Fetch` of a map output is refused with a `ShuffleReply::Error`.
pub async fn serve_input_request<S>(framed: &mut S, inputs: &InputFiles) -> Result<(), ShuffleError>
where
    S: futures::Stream<Item = Result<ShuffleRequest, CodecError>>
        + futures::Sink<ShuffleReply, Error = CodecError>
        + Unpin,
{
    let (path, offset, len) = match next_frame(framed).await? {
        ShuffleRequest::FetchInput { path, offset, len } => (path, offset, len),
        ShuffleRequest::Fetch(key) => {
            let reason = format!("the coordinator serves job inputs only, not {key:?}");
            framed.send(ShuffleReply::Error(reason.clone())).await?;
            return Err(ShuffleError::Remote(reason));
        }
    };
    let (mut file, end) = match open_input(inputs, &path, offset, len).await {
        Ok(x) => x,
        Err(reason) => {
            tracing::warn!(%reason, "refused an input fetch");
            framed.send(ShuffleReply::Error(reason.clone())).await?;
            return Err(ShuffleError::Remote(reason));
        }
    };
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut left = end - offset;
    let mut buf = vec![0u8; SHUFFLE_CHUNK_BYTES];
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            break;
        }
        left -= n as u64;
        tokio::time::timeout(
            SHUFFLE_IO_TIMEOUT,
            framed.send(ShuffleReply::Data(buf[..n].to_vec())),
        )
        .await
        .map_err(|_| ShuffleError::Timeout)??;
    }
    let total_bytes = end - offset - left;
    framed.send(ShuffleReply::End { total_bytes }).await?;
    Ok(())
}

/// Opens job input `path` for the range asked, checking (with `shoal_mr`'s rules) that it is
/// an input and unchanged; returns the file and the end of the range, or why not.
async fn open_input(
    inputs: &InputFiles,
    path: &Path,
    offset: u64,
    len: Option<u64>,
) -> Result<(tokio::fs::File, u64), String> {
    inputs.check_input(path)?;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("cannot open input {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| format!("cannot stat input {}: {e}", path.display()))?;
    let end = inputs.check_range(path, offset, len, &meta)?;
    Ok((file, end))
}

/// Connects to `addr` and sends the shuffle handshake for job `job_id` and `request`.
async fn open_fetch(
    security: &Security,
    addr: &str,
    job_id: u64,
    request: ShuffleRequest,
) -> Result<Framed<Stream, FrameCodec<ShuffleReply, ShuffleRequest>>, ShuffleError> {
    let stream = super::net::dial(security, addr, SHUFFLE_CONNECT_TIMEOUT)
        .await
        .map_err(|source| ShuffleError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let mut framed = Framed::new(
        stream,
        FrameCodec::<ShuffleReply, Hello>::new(SHUFFLE_MAX_FRAME_BYTES),
    );
    framed.send(Hello::new(Role::Shuffle, job_id)).await?;
    let mut framed = framed
        .map_codec(|_| FrameCodec::<ShuffleReply, ShuffleRequest>::new(SHUFFLE_MAX_FRAME_BYTES));
    framed.send(request).await?;
    Ok(framed)
}

/// Fetches bytes `[offset, offset + len)` of job input `path` (to its end when `len` is
/// `None`) from the coordinator at `addr` into memory, as a map task reads its split into
/// memory. The length is checked: exactly `len` bytes, or the error.
pub async fn fetch_input(
    security: &Security,
    addr: &str,
    job_id: u64,
    path: &Path,
    offset: u64,
    len: Option<u64>,
) -> Result<Vec<u8>, ShuffleError> {
    let request = ShuffleRequest::FetchInput {
        path: path.to_path_buf(),
        offset,
        len,
    };
    let mut framed = open_fetch(security, addr, job_id, request).await?;
    let mut contents = Vec::with_capacity(len.map_or(0, |l| usize::try_from(l).unwrap_or(0)));
    loop {
        match next_frame(&mut framed).await {
            Ok(ShuffleReply::Data(chunk)) => {
                contents.extend_from_slice(&chunk);
                if len.is_some_and(|l| contents.len() as u64 > l) {
                    return Err(ShuffleError::Length {
                        got: contents.len() as u64,
                        expected: len.unwrap_or(0),
                    });
                }
            }
            Ok(ShuffleReply::End { total_bytes }) => {
                let got = contents.len() as u64;
                if total_bytes != got || len.is_some_and(|l| l != got) {
                    return Err(ShuffleError::Length {
                        got,
                        expected: len.unwrap_or(total_bytes),
                    });
                }
                return Ok(contents);
            }
            Ok(ShuffleReply::Error(e)) => return Err(ShuffleError::Remote(e)),
            Err(ShuffleError::Truncated(_)) => {
                return Err(ShuffleError::Truncated(contents.len() as u64))
            }
            Err(e) => return Err(e),
        }
    }
}

async fn send_file<S>(framed: &mut S, path: &Path) -> Result<(), ShuffleError>
where
    S: futures::Sink<ShuffleReply, Error = CodecError> + Unpin,
{
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            framed
                .send(ShuffleReply::Error(format!("{}: {e}", path.display())))
                .await?;
            return Ok(());
        }
    };
    let mut total: u64 = 0;
    let mut buf = vec![0u8; SHUFFLE_CHUNK_BYTES];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
        tokio::time::timeout(
            SHUFFLE_IO_TIMEOUT,
            framed.send(ShuffleReply::Data(buf[..n].to_vec())),
        )
        .await
        .map_err(|_| ShuffleError::Timeout)??;
    }
    framed
        .send(ShuffleReply::End { total_bytes: total })
        .await?;
    Ok(())
}

/// Fetches `key` from the shuffle server at `addr` into `dest` (written to a temporary name
/// and renamed when complete; fsynced first if `kind` is [`Fetched::Durable`]). Returns the
/// number of bytes.
pub async fn fetch_file(
    security: &Security,
    addr: &str,
    job_id: u64,
    key: FileKey,
    dest: &Path,
    kind: Fetched,
) -> Result<u64, ShuffleError> {
    let mut framed = open_fetch(security, addr, job_id, ShuffleRequest::Fetch(key)).await?;

    let tmp = dest.with_extension("part");
    let local = |error: std::io::Error| ShuffleError::LocalWrite {
        path: tmp.clone(),
        error,
    };
    let mut out = tokio::fs::File::create(&tmp).await.map_err(local)?;
    let mut got: u64 = 0;
    let result = loop {
        match next_frame(&mut framed).await {
            Ok(ShuffleReply::Data(chunk)) => {
                got += chunk.len() as u64;
                if let Err(e) = out.write_all(&chunk).await {
                    break Err(local(e));
                }
            }
            Ok(ShuffleReply::End { total_bytes }) if total_bytes == got => break Ok(got),
            Ok(ShuffleReply::End { total_bytes }) => {
                break Err(ShuffleError::Length {
                    got,
                    expected: total_bytes,
                })
            }
            Ok(ShuffleReply::Error(e)) => break Err(ShuffleError::Remote(e)),
            Err(ShuffleError::Truncated(_)) => break Err(ShuffleError::Truncated(got)),
            Err(e) => break Err(e),
        }
    };
    match result {
        Ok(n) => {
            let finished = async {
                out.flush().await?;
                if kind == Fetched::Durable {
                    out.sync_all().await?;
                }
                drop(out);
                tokio::fs::rename(&tmp, dest).await
            };
            match finished.await {
                Ok(()) => Ok(n),
                Err(e) => {
                    // A full disk fails here as often as in write_all: the partial file must
                    // not stay behind to make it fuller.
                    let _ = tokio::fs::remove_file(&tmp).await;
                    Err(local(e))
                }
            }
        }
        Err(e) => {
            drop(out);
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_registered_files_only_to_the_right_job() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let data: Vec<u8> = (0..3 * SHUFFLE_CHUNK_BYTES + 17).map(|i| i as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let table = FileTable::default();
        table.set_job_id(7);
        let key = FileKey::MapOutput {
            map_task: 1,
            attempt: 0,
            partition: 2,
        };
        table.insert(key, src);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(serve_shuffle(listener, table, Security::plain()));

        let dest = dir.path().join("dest");
        assert_eq!(
            fetch_file(&Security::plain(), &addr, 7, key, &dest, Fetched::Durable)
                .await
                .unwrap(),
            data.len() as u64
        );
        assert_eq!(std::fs::read(&dest).unwrap(), data);

        let other = FileKey::ReduceOutput {
            reduce_task: 0,
            attempt: 0,
        };
        let err = fetch_file(
            &Security::plain(),
            &addr,
            7,
            other,
            &dir.path().join("x"),
            Fetched::Scratch,
        )
        .await;
        assert!(matches!(err, Err(ShuffleError::Remote(_))), "{err:?}");
        let err = fetch_file(
            &Security::plain(),
            &addr,
            8,
            key,
            &dir.path().join("y"),
            Fetched::Scratch,
        )
        .await;
        assert!(matches!(err, Err(ShuffleError::Remote(_))), "{err:?}");
        assert!(!dir.path().join("y").exists());
        server.abort();
    }

    /// What the coordinator does with a shuffle handshake (see the driver's `connection`).
    async fn serve_inputs(listener: TcpListener, job_id: u64, inputs: InputFiles) {
        while let Ok((stream, _)) = listener.accept().await {
            let inputs = inputs.clone();
            tokio::spawn(async move {
                let mut framed = Framed::new(
                    stream,
                    FrameCodec::<Hello, ShuffleReply>::new(SHUFFLE_MAX_FRAME_BYTES),
                );
                let Some(Ok(hello)) = framed.next().await else {
                    return;
                };
                let mut framed = framed.map_codec(|_| {
                    FrameCodec::<ShuffleRequest, ShuffleReply>::new(SHUFFLE_MAX_FRAME_BYTES)
                });
                if let Some(reason) = shuffle_hello_refusal(&hello, job_id, "coordinator") {
                    let _ = framed.send(ShuffleReply::Error(reason)).await;
                    return;
                }
                let _ = serve_input_request(&mut framed, &inputs).await;
            });
        }
    }

    #[tokio::test]
    async fn inputs_are_served_byte_identical_and_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input.txt");
        let secret = dir.path().join("secret.txt");
        let data: Vec<u8> = (0..2 * SHUFFLE_CHUNK_BYTES + 17).map(|i| i as u8).collect();
        std::fs::write(&input, &data).unwrap();
        std::fs::write(&secret, b"not an input").unwrap();
        let inputs = InputFiles::snapshot(std::slice::from_ref(&input)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(serve_inputs(listener, 9, inputs));

        // A range across chunk boundaries, and the whole file.
        let (offset, len) = (5, SHUFFLE_CHUNK_BYTES as u64 + 100);
        let got = fetch_input(&Security::plain(), &addr, 9, &input, offset, Some(len))
            .await
            .unwrap();
        assert_eq!(got, &data[5..5 + len as usize]);
        let got = fetch_input(&Security::plain(), &addr, 9, &input, 0, None)
            .await
            .unwrap();
        assert_eq!(got, data);
        let got = fetch_input(
            &Security::plain(),
            &addr,
            9,
            &input,
            data.len() as u64,
            Some(0),
        )
        .await;
        assert_eq!(got.unwrap(), Vec::<u8>::new());

        let refused = |r: Result<Vec<u8>, ShuffleError>, want: &str| match r {
            Err(ShuffleError::Remote(e)) => assert!(e.contains(want), "{e}"),
            other => panic!("expected a refusal containing {want:?}, got {other:?}"),
        };
        refused(
            fetch_input(&Security::plain(), &addr, 9, &secret, 0, None).await,
            "is not an input of this job",
        );
        refused(
            fetch_input(
                &Security::plain(),
                &addr,
                9,
                Path::new("/etc/passwd"),
                0,
                None,
            )
            .await,
            "is not an input of this job",
        );
        refused(
            fetch_input(
                &Security::plain(),
                &addr,
                9,
                &input,
                10,
                Some(data.len() as u64),
            )
            .await,
            "beyond input",
        );
        refused(
            fetch_input(&Security::plain(), &addr, 9, &input, u64::MAX, Some(2)).await,
            "beyond input",
        );
        refused(
            fetch_input(&Security::plain(), &addr, 8, &input, 0, None).await,
            "job id",
        );
        // A map output is not the coordinator's to serve.
        let key = FileKey::MapOutput {
            map_task: 0,
            attempt: 0,
            partition: 0,
        };
        let err = fetch_file(
            &Security::plain(),
            &addr,
            9,
            key,
            &dir.path().join("x"),
            Fetched::Scratch,
        )
        .await;
        assert!(matches!(err, Err(ShuffleError::Remote(_))), "{err:?}");

        // An input that changed under the job is refused, not served half old, half new.
        std::io::Write::write_all(
            &mut std::fs::OpenOptions::new()
                .append(true)
                .open(&input)
                .unwrap(),
            b"more",
        )
        .unwrap();
        refused(
            fetch_input(&Security::plain(), &addr, 9, &input, 0, Some(10)).await,
            "changed since the job started",
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_connection_lost_mid_fetch_is_an_error_not_a_short_split() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // A server that sends one chunk of the three asked for, then goes away.
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut framed = Framed::new(
                stream,
                FrameCodec::<Hello, ShuffleReply>::new(SHUFFLE_MAX_FRAME_BYTES),
            );
            framed.next().await.unwrap().unwrap();
            let mut framed = framed.map_codec(|_| {
                FrameCodec::<ShuffleRequest, ShuffleReply>::new(SHUFFLE_MAX_FRAME_BYTES)
            });
            framed.next().await.unwrap().unwrap();
            framed
                .send(ShuffleReply::Data(vec![7; SHUFFLE_CHUNK_BYTES]))
                .await
                .unwrap();
        });
        let len = 3 * SHUFFLE_CHUNK_BYTES as u64;
        let err = fetch_input(
            &Security::plain(),
            &addr,
            9,
            Path::new("in.txt"),
            0,
            Some(len),
        )
        .await;
        assert!(
            matches!(err, Err(ShuffleError::Truncated(n)) if n == SHUFFLE_CHUNK_BYTES as u64),
            "{err:?}"
        );
        server.await.unwrap();
    }
}
