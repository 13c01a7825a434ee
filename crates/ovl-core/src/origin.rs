//! `overlay.origin`: the file handle of the lower object an upper object was copied up from, in
//! the kernel's `struct ovl_fb` layout:
//! `u8 version (0), u8 magic (0xfb), u8 len, u8 flags, u8 fid type, u8 uuid[16], fid bytes`.

use crate::sys::FileHandle;

const MAGIC: u8 = 0xfb;
const HEADER: usize = 21;
const FLAG_BIG_ENDIAN: u8 = 1 << 0;
const FLAG_ANY_ENDIAN: u8 = 1 << 1;
const FLAG_PATH_UPPER: u8 = 1 << 2;
const FLAGS_ALL: u8 = FLAG_BIG_ENDIAN | FLAG_ANY_ENDIAN | FLAG_PATH_UPPER;
/// The largest encoded origin we accept (the kernel's limit on an overlay file handle).
pub const MAX_LEN: usize = HEADER + 128;

/// A decoded `overlay.origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// UUID of the filesystem the handle belongs to.
    pub uuid: [u8; 16],
    /// The handle.
    pub handle: FileHandle,
    /// The handle names an upper object (used by the kernel's index), not a lower one.
    pub path_upper: bool,
}

/// Why an origin value cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginError {
    /// Not a valid encoding: the kernel fails the lookup with `EIO`.
    Corrupt,
    /// Valid but written on a host of the other byte order: ignored, as by the kernel.
    OtherEndian,
}

impl Origin {
    /// Encodes for storing in `overlay.origin`.
    pub fn encode(&self) -> Vec<u8> {
        let len = HEADER + self.handle.bytes.len();
        let mut flags = if cfg!(target_endian = "big") { FLAG_BIG_ENDIAN } else { 0 };
        if self.path_upper {
            flags |= FLAG_PATH_UPPER;
        }
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&[0, MAGIC, len as u8, flags, self.handle.handle_type as u8]);
        v.extend_from_slice(&self.uuid);
        v.extend_from_slice(&self.handle.bytes);
        v
    }

    /// Decodes an `overlay.origin` value, checking everything the kernel checks. Never panics,
    /// whatever the bytes.
    pub fn decode(v: &[u8]) -> Result<Self, OriginError> {
        if v.len() < HEADER || v.len() > MAX_LEN || v[0] != 0 || v[1] != MAGIC || v[3] & !FLAGS_ALL != 0 {
            return Err(OriginError::Corrupt);
        }
        if v[2] as usize != v.len() {
            return Err(OriginError::Corrupt);
        }
        let flags = v[3];
        let ours = if cfg!(target_endian = "big") { FLAG_BIG_ENDIAN } else { 0 };
        if flags & FLAG_ANY_ENDIAN == 0 && flags & FLAG_BIG_ENDIAN != ours {
            return Err(OriginError::OtherEndian);
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&v[5..HEADER]);
        Ok(Origin {
            uuid,
            handle: FileHandle { handle_type: v[4] as i32, bytes: v[HEADER..].to_vec() },
            path_upper: flags & FLAG_PATH_UPPER != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_a_kernel_value() {
        // Written by the kernel (6.18) for an ext4 file: type 1 (ino32+gen), null uuid.
        let kernel = [
            0x00, 0xfb, 0x1d, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x58, 0x64, 0x99, 0x00, 0x2d,
            0x4f, 0x3f, 0xd1,
        ];
        let o = Origin::decode(&kernel).unwrap();
        assert_eq!(o.handle.handle_type, 1);
        assert_eq!(o.handle.bytes.len(), 8);
        assert_eq!(o.encode(), kernel);
    }

    #[test]
    fn hostile_values_are_rejected_not_trusted() {
        assert_eq!(Origin::decode(&[]), Err(OriginError::Corrupt));
        assert_eq!(Origin::decode(&[0, 0xfb, 21, 0, 1]), Err(OriginError::Corrupt));
        let mut v = vec![0, 0xfb, 29, 0, 1];
        v.extend_from_slice(&[0; 24]);
        assert!(Origin::decode(&v).is_ok());
        let mut bad = v.clone();
        bad[2] = 200;
        assert_eq!(Origin::decode(&bad), Err(OriginError::Corrupt));
        let mut bad = v.clone();
        bad[1] = 0xfa;
        assert_eq!(Origin::decode(&bad), Err(OriginError::Corrupt));
        let mut bad = v.clone();
        bad[3] = 0x80;
        assert_eq!(Origin::decode(&bad), Err(OriginError::Corrupt));
        let mut be = v.clone();
        be[3] = FLAG_BIG_ENDIAN;
        assert_eq!(Origin::decode(&be), Err(OriginError::OtherEndian));
        let long = vec![0u8; 4096];
        assert_eq!(Origin::decode(&long), Err(OriginError::Corrupt));
    }
}
