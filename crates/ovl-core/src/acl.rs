//! POSIX ACLs as stored in `system.posix_acl_access` / `system.posix_acl_default` (the kernel's
//! version-2 xattr format), and what a new object inherits from its parent's default ACL
//! (`posix_acl_create` in the kernel): the overlay must do that itself, because it makes new
//! objects in the work dir and renames them into place, out of reach of the parent's default ACL.

use crate::{Errno, Result};

/// The xattr holding an object's access ACL.
pub const ACCESS: &std::ffi::CStr = c"system.posix_acl_access";
/// The xattr holding a directory's default ACL.
pub const DEFAULT: &std::ffi::CStr = c"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// One ACL entry: tag, permission bits (`rwx` as 4/2/1) and the uid/gid of named entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A parsed ACL, entries in stored order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    /// Parses the xattr value; `EINVAL` for anything the kernel would not have stored.
    pub fn parse(value: &[u8]) -> Result<Acl> {
        let (head, body) = value.split_at_checked(4).ok_or(Errno::INVAL)?;
        if u32::from_le_bytes(head.try_into().map_err(|_| Errno::INVAL)?) != VERSION || body.len() % 8 != 0 {
            return Err(Errno::INVAL.into());
        }
        let entries: Vec<Entry> = body
            .chunks_exact(8)
            .map(|c| Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        let count = |tag| entries.iter().filter(|e| e.tag == tag).count();
        let known = entries.iter().all(|e| [USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&e.tag));
        if !known || count(USER_OBJ) != 1 || count(GROUP_OBJ) != 1 || count(OTHER) != 1 || count(MASK) > 1 {
            return Err(Errno::INVAL.into());
        }
        Ok(Acl { entries })
    }

    /// Maps the IDs of the named user (`uid`) and named group (`gid`) entries, for a mount that
    /// shows other IDs than its layers store.
    pub fn map_ids(&mut self, uid: impl Fn(u32) -> u32, gid: impl Fn(u32) -> u32) {
        for e in &mut self.entries {
            match e.tag {
                USER => e.id = uid(e.id),
                GROUP => e.id = gid(e.id),
                _ => {}
            }
        }
    }

    /// The xattr value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    /// What a new object made with permission bits `mode` gets from this default ACL, as the
    /// kernel's `posix_acl_create`: the mode narrowed by the ACL's owner, group-or-mask and other
    /// entries (the umask does not apply), and the access ACL to store, `None` when the mode says
    /// it all (no named entries and no mask). Bits outside `0o777` pass through.
    pub fn inherit(&self, mode: u32) -> (u32, Option<Acl>) {
        let mut acl = self.clone();
        let mut mode = mode;
        let mut equivalent = true;
        let (mut group_obj, mut mask) = (None, None);
        for (i, e) in acl.entries.iter_mut().enumerate() {
            match e.tag {
                USER_OBJ => {
                    e.perm &= ((mode >> 6) & 7) as u16;
                    mode &= (u32::from(e.perm) << 6) | !0o700;
                }
                USER | GROUP => equivalent = false,
                GROUP_OBJ => group_obj = Some(i),
                OTHER => {
                    e.perm &= (mode & 7) as u16;
                    mode &= u32::from(e.perm) | !0o007;
                }
                MASK => {
                    mask = Some(i);
                    equivalent = false;
                }
                _ => {}
            }
        }
        // The mask, if any, stands for the group class; otherwise the owning group does.
        if let Some(i) = mask.or(group_obj) {
            let e = &mut acl.entries[i];
            e.perm &= ((mode >> 3) & 7) as u16;
            mode &= (u32::from(e.perm) << 3) | !0o070;
        }
        (mode, (!equivalent).then_some(acl))
    }

    /// Whether this access ACL grants `want` (`rwx` bits as 4/2/1) to a caller with fsuid `uid`
    /// who is in the groups `in_group` accepts, on an object owned by `owner`/`group`, as the
    /// kernel's `posix_acl_permission`: the owner entry for the owner; else a named user entry,
    /// limited by the mask; else every matching group entry (owning group or named), limited by
    /// the mask, and denial if some matched but none grants; else the other entry.
    pub fn permits(&self, uid: u32, in_group: impl Fn(u32) -> bool, owner: u32, group: u32, want: u16) -> bool {
        let mask = self.entries.iter().find(|e| e.tag == MASK).map_or(7, |e| e.perm);
        let grants = |perm: u16| perm & want == want;
        let mut group_matched = false;
        for e in &self.entries {
            match e.tag {
                USER_OBJ if uid == owner => return grants(e.perm),
                USER if e.id == uid => return grants(e.perm & mask),
                GROUP_OBJ | GROUP => {
                    let gid = if e.tag == GROUP_OBJ { group } else { e.id };
                    if in_group(gid) {
                        group_matched = true;
                        if grants(e.perm & mask) {
                            return true;
                        }
                    }
                }
                _ => {}
            }
        }
        !group_matched && self.entries.iter().any(|e| e.tag == OTHER && grants(e.perm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        Acl { entries: entries.iter().map(|&(tag, perm, id)| Entry { tag, perm, id }).collect() }
    }

    const ANY: u32 = u32::MAX;

    #[test]
    fn values_round_trip_and_malformed_ones_are_refused() {
        let a = acl(&[(USER_OBJ, 7, ANY), (USER, 5, 1000), (GROUP_OBJ, 5, ANY), (MASK, 7, ANY), (OTHER, 0, ANY)]);
        assert_eq!(Acl::parse(&a.to_bytes()).unwrap(), a);
        let mut bad_version = a.to_bytes();
        bad_version[0] = 1;
        for bad in [
            &[][..],
            &bad_version[..],
            &a.to_bytes()[..a.to_bytes().len() - 1],
            &acl(&[(USER_OBJ, 7, ANY), (OTHER, 0, ANY)]).to_bytes()[..],
            &acl(&[(USER_OBJ, 7, ANY), (GROUP_OBJ, 5, ANY), (OTHER, 0, ANY), (0x40, 1, 1)]).to_bytes()[..],
        ] {
            assert!(Acl::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_minimal_default_acl_replaces_the_umask_and_needs_no_access_acl() {
        let d = acl(&[(USER_OBJ, 7, ANY), (GROUP_OBJ, 5, ANY), (OTHER, 5, ANY)]);
        assert_eq!(d.inherit(0o666), (0o644, None));
        assert_eq!(d.inherit(0o777), (0o755, None));
        assert_eq!(d.inherit(0o4777), (0o4755, None), "bits beyond rwx pass through");
    }

    #[test]
    fn permission_follows_the_kernels_order_owner_named_user_groups_other() {
        let a = acl(&[
            (USER_OBJ, 7, ANY),
            (USER, 7, 1000),
            (GROUP_OBJ, 4, ANY),
            (GROUP, 0, 50),
            (MASK, 5, ANY),
            (OTHER, 4, ANY),
        ]);
        let none = |_| false;
        assert!(a.permits(0, none, 0, 0, 7), "the owner entry, not limited by the mask");
        assert!(a.permits(1000, none, 0, 0, 5) && !a.permits(1000, none, 0, 0, 2), "named user, masked");
        assert!(a.permits(7, |g| g == 0, 0, 0, 4), "owning group reads");
        assert!(!a.permits(7, |g| g == 50, 0, 0, 4), "a matching group that grants nothing denies, other is not asked");
        assert!(a.permits(7, |g| g == 50 || g == 0, 0, 0, 4), "any matching group may grant");
        assert!(a.permits(7, none, 0, 0, 4) && !a.permits(7, none, 0, 0, 1), "other");
    }

    #[test]
    fn named_entries_and_a_mask_give_an_access_acl_narrowed_by_the_mode() {
        let d = acl(&[(USER_OBJ, 7, ANY), (USER, 7, 1000), (GROUP_OBJ, 5, ANY), (MASK, 7, ANY), (OTHER, 0, ANY)]);
        let (mode, access) = d.inherit(0o666);
        assert_eq!(mode, 0o660);
        assert_eq!(
            access.unwrap(),
            acl(&[(USER_OBJ, 6, ANY), (USER, 7, 1000), (GROUP_OBJ, 5, ANY), (MASK, 6, ANY), (OTHER, 0, ANY)]),
            "named entries keep their bits: the mask limits them"
        );
    }
}
