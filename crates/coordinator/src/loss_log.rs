//! The loss of every optimizer step of a run, in an append-only file of its
//! directory (`step_losses.f32`: little-endian `f32`s, one per step), so that a
//! checkpoint stays the same size however long the run (its `state.json` records
//! only the step count, and a resume reads that many losses back).
//!
//! A checkpoint brings the file up to its step before it is committed; a crash in
//! between leaves extra losses at the end, which a read ignores. A resume reads its
//! checkpoint's losses with [`resume`], which cuts the file back to them: the steps
//! after belong to the attempt being replaced, and the next write appends the new
//! attempt's steps after the ones kept.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::CoordinatorError;

/// The file's name in the run directory.
pub(crate) const FILE: &str = "step_losses.f32";

const WIDTH: usize = std::mem::size_of::<f32>();

fn path(run_dir: &Path) -> PathBuf {
    run_dir.join(FILE)
}

/// Makes the file hold exactly `losses`: the ones it already holds stay (the same
/// steps of this attempt: [`resume`] cut off any others), the missing ones are
/// appended, anything beyond is cut off. Writes and syncs only what is new.
pub(crate) fn write(run_dir: &Path, losses: &[f32]) -> Result<(), CoordinatorError> {
    let path = path(run_dir);
    let io = |e| CoordinatorError::io(&path, e);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    let held = usize::try_from(file.metadata().map_err(io)?.len() / WIDTH as u64)
        .unwrap_or(usize::MAX)
        .min(losses.len());
    file.set_len((held * WIDTH) as u64).map_err(io)?;
    file.seek(SeekFrom::End(0)).map_err(io)?;
    let bytes: Vec<u8> = losses[held..]
        .iter()
        .flat_map(|l| l.to_le_bytes())
        .collect();
    file.write_all(&bytes).map_err(io)?;
    file.sync_data().map_err(io)
}

/// The first `steps` losses of the run, for a resume from a checkpoint at `steps`:
/// the file is cut back to them.
///
/// # Errors
/// When the file cannot be read or cut, or holds fewer than `steps` losses.
pub(crate) fn resume(run_dir: &Path, steps: u64) -> Result<Vec<f32>, CoordinatorError> {
    let losses = read(run_dir, steps)?;
    let path = path(run_dir);
    OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|file| {
            file.set_len(steps.saturating_mul(WIDTH as u64))?;
            file.sync_data()
        })
        .map_err(|e| CoordinatorError::io(&path, e))?;
    Ok(losses)
}

/// The first `steps` losses of the run.
///
/// # Errors
/// When the file cannot be read or holds fewer than `steps` losses.
fn read(run_dir: &Path, steps: u64) -> Result<Vec<f32>, CoordinatorError> {
    let path = path(run_dir);
    let mut bytes = Vec::new();
    let wanted = usize::try_from(steps)
        .unwrap_or(usize::MAX)
        .saturating_mul(WIDTH);
    std::fs::File::open(&path)
        .and_then(|f| f.take(wanted as u64).read_to_end(&mut bytes))
        .map_err(|e| CoordinatorError::io(&path, e))?;
    if bytes.len() < wanted {
        return Err(CoordinatorError::io(
            &path,
            std::io::Error::other(format!(
                "it holds the losses of {} steps, the checkpoint needs {steps}",
                bytes.len() / WIDTH
            )),
        ));
    }
    Ok(bytes
        .chunks_exact(WIDTH)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_appended_cut_back_and_read_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let losses: Vec<f32> = (0..10).map(|i| 1.0 / (i as f32 + 1.0)).collect();
        write(dir.path(), &losses[..4]).unwrap();
        write(dir.path(), &losses).unwrap();
        assert_eq!(read(dir.path(), 10).unwrap(), losses);
        assert_eq!(read(dir.path(), 3).unwrap(), &losses[..3]);
        // A resume from step 6 continues with other losses: the tail is replaced.
        let mut resumed = resume(dir.path(), 6).unwrap();
        assert_eq!(resumed, &losses[..6]);
        resumed.extend([9.0, 8.0]);
        write(dir.path(), &resumed).unwrap();
        assert_eq!(read(dir.path(), 8).unwrap(), resumed);
        let short = read(dir.path(), 9).unwrap_err();
        assert!(format!("{short:?}").contains("8 steps"), "{short:?}");
    }

    #[test]
    fn a_torn_last_loss_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[1.0, 2.0]).unwrap();
        let mut file = OpenOptions::new()
            .append(true)
            .open(path(dir.path()))
            .unwrap();
        file.write_all(&[0xAB, 0xCD]).unwrap();
        write(dir.path(), &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(read(dir.path(), 3).unwrap(), [1.0, 2.0, 3.0]);
    }
}
