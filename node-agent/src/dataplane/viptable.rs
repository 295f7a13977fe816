//! User-space side of the open-addressed VIP tables (see
//! `kube_dsr_common::VipSlot4` for the layout and the publication order).
//! Every store the packet path must see in order is a volatile store to one
//! field, with a release fence before the store that publishes.

use std::{
    ptr::{addr_of_mut, write_volatile},
    sync::atomic::{Ordering, fence},
};

use kube_dsr_common::{
    SLOT_DELETED, SLOT_EMPTY, SLOT_USED, VIP_PROBES, VIP_SLOTS, VipKey4, VipKey6, VipSlot4,
    VipSlot6, VipValue, vip_slot4, vip_slot6,
};

use super::sys::Mapped;

/// What the table code needs to know about a slot type.
pub trait Slot: Copy {
    type Key: Copy + PartialEq;
    fn key(&self) -> Self::Key;
    fn state(&self) -> u8;
    fn active(&self) -> u32;
    fn value(&self) -> VipValue;
    fn first(key: &Self::Key) -> u32;
    /// A slot for `key` holding `value` in both halves, `active` 0.
    fn filled(key: &Self::Key, value: &VipValue, state: u8) -> Self;
    /// Field pointers into a live slot.
    fn state_ptr(p: *mut Self) -> *mut u8;
    fn active_ptr(p: *mut Self) -> *mut u32;
    fn value_ptr(p: *mut Self, half: usize) -> *mut VipValue;
}

macro_rules! slot_impl {
    ($slot:ty, $key:ty, $first:expr, $filled:expr) => {
        impl Slot for $slot {
            type Key = $key;

            fn key(&self) -> $key {
                <$key>::from_slot(self)
            }
            fn state(&self) -> u8 {
                self.state
            }
            fn active(&self) -> u32 {
                self.active
            }
            fn value(&self) -> VipValue {
                self.values[(self.active & 1) as usize]
            }
            fn first(k: &$key) -> u32 {
                $first(k)
            }
            fn filled(k: &$key, value: &VipValue, state: u8) -> Self {
                $filled(k, value, state)
            }
            fn state_ptr(p: *mut Self) -> *mut u8 {
                // SAFETY: p points at a live slot; no reference is created.
                unsafe { addr_of_mut!((*p).state) }
            }
            fn active_ptr(p: *mut Self) -> *mut u32 {
                // SAFETY: as above.
                unsafe { addr_of_mut!((*p).active) }
            }
            fn value_ptr(p: *mut Self, half: usize) -> *mut VipValue {
                // SAFETY: as above; half is 0 or 1.
                unsafe { addr_of_mut!((*p).values[half & 1]) }
            }
        }
    };
}

trait FromSlot<S> {
    fn from_slot(s: &S) -> Self;
}

impl FromSlot<VipSlot4> for VipKey4 {
    fn from_slot(s: &VipSlot4) -> Self {
        Self { addr: s.addr, port: s.port, proto: s.proto, _pad: 0 }
    }
}

impl FromSlot<VipSlot6> for VipKey6 {
    fn from_slot(s: &VipSlot6) -> Self {
        Self { addr: s.addr, port: s.port, proto: s.proto, _pad: 0 }
    }
}

slot_impl!(
    VipSlot4,
    VipKey4,
    |k: &VipKey4| vip_slot4(k.addr, k.port, k.proto),
    |k: &VipKey4, v: &VipValue, state| VipSlot4 {
        addr: k.addr,
        port: k.port,
        proto: k.proto,
        state,
        active: 0,
        _pad: 0,
        values: [*v, *v],
    }
);

slot_impl!(
    VipSlot6,
    VipKey6,
    |k: &VipKey6| vip_slot6(&k.addr, k.port, k.proto),
    |k: &VipKey6, v: &VipValue, state| VipSlot6 {
        addr: k.addr,
        port: k.port,
        proto: k.proto,
        state,
        active: 0,
        values: [*v, *v],
    }
);

fn probe(first: u32) -> impl Iterator<Item = usize> {
    (0..VIP_PROBES).map(move |i| ((first + i) & (VIP_SLOTS - 1)) as usize)
}

/// The slot holding `key`, if any.
pub fn find<S: Slot>(table: &Mapped<S>, key: &S::Key) -> Option<usize> {
    let slots = table.as_slice();
    for i in probe(S::first(key)) {
        let s = &slots[i];
        if s.state() == SLOT_USED && s.key() == *key {
            return Some(i);
        }
        if s.state() == SLOT_EMPTY {
            return None;
        }
    }
    None
}

/// Sets `key`'s value; `false` when every slot within reach is taken.
pub fn set<S: Slot>(table: &mut Mapped<S>, key: &S::Key, value: &VipValue) -> bool {
    if let Some(i) = find(table, key) {
        let next = 1 - (table.as_slice()[i].active() & 1);
        let p = table.element(i);
        // Write the idle half, then flip: a packet reads the old value or
        // the new one, whole.
        // SAFETY: p points at slot i of the live mapping.
        unsafe { write_volatile(S::value_ptr(p, next as usize), *value) };
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { write_volatile(S::active_ptr(p), next) };
        return true;
    }
    let free = probe(S::first(key)).find(|&i| table.as_slice()[i].state() != SLOT_USED);
    let Some(i) = free else {
        return false;
    };
    let state = table.as_slice()[i].state();
    let p = table.element(i);
    // Fill while unpublished (still empty or deleted), then publish.
    // SAFETY: p points at slot i of the live mapping.
    unsafe { write_volatile(p, S::filled(key, value, state)) };
    fence(Ordering::Release);
    // SAFETY: as above.
    unsafe { write_volatile(S::state_ptr(p), SLOT_USED) };
    true
}

/// The first of `keys` that [`set`] could not place if they were all set
/// (keys already in the table are updated in place and always fit);
/// nothing is written.
pub fn unplaceable<S: Slot>(table: &Mapped<S>, keys: &[S::Key]) -> Option<S::Key> {
    let slots = table.as_slice();
    let mut claimed: Vec<usize> = Vec::new();
    let mut seen: Vec<S::Key> = Vec::new();
    for key in keys {
        if find(table, key).is_some() || seen.contains(key) {
            continue;
        }
        seen.push(*key);
        let free =
            probe(S::first(key)).find(|i| slots[*i].state() != SLOT_USED && !claimed.contains(i));
        match free {
            Some(i) => claimed.push(i),
            None => return Some(*key),
        }
    }
    None
}

/// Removes `key`, leaving a tombstone so probe chains past it stay intact.
pub fn remove<S: Slot>(table: &mut Mapped<S>, key: &S::Key) {
    if let Some(i) = find(table, key) {
        let p = table.element(i);
        // SAFETY: p points at slot i of the live mapping.
        unsafe { write_volatile(S::state_ptr(p), SLOT_DELETED) };
    }
}

/// Every published entry with its live value.
pub fn entries<S: Slot>(table: &Mapped<S>) -> Vec<(S::Key, VipValue)> {
    table
        .as_slice()
        .iter()
        .filter(|s| s.state() == SLOT_USED)
        .map(|s| (s.key(), s.value()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> VipKey4 {
        VipKey4 { addr: 0x0a00_0000 + i, port: 80u16.to_be(), proto: 6, _pad: 0 }
    }

    fn value(svc_id: u32) -> VipValue {
        VipValue { svc_id, ring_base: 0, ring_size: 251, prev_base: 0, prev_size: 0, flags: 0 }
    }

    fn table() -> Mapped<VipSlot4> {
        Mapped::anonymous(VIP_SLOTS as usize).unwrap()
    }

    #[test]
    fn set_find_update_remove() {
        let mut t = table();
        assert!(set(&mut t, &key(1), &value(1)));
        let i = find(&t, &key(1)).unwrap();
        assert_eq!(t.as_slice()[i].value(), value(1));
        assert!(set(&mut t, &key(1), &value(2)));
        assert_eq!(find(&t, &key(1)), Some(i), "an update stays in place");
        assert_eq!(t.as_slice()[i].value(), value(2));
        assert_eq!(t.as_slice()[i].active, 1, "the update went to the idle half");
        remove(&mut t, &key(1));
        assert_eq!(find(&t, &key(1)), None);
        assert_eq!(t.as_slice()[i].state, SLOT_DELETED);
        assert!(entries(&t).is_empty());
    }

    #[test]
    fn a_quarter_full_table_places_every_key_and_tombstones_keep_chains() {
        let mut t = table();
        let n = VIP_SLOTS / 4;
        for i in 0..n {
            assert!(set(&mut t, &key(i), &value(i)), "key {i} not placed");
        }
        // Delete every other key; the rest must still be found.
        for i in (0..n).step_by(2) {
            remove(&mut t, &key(i));
        }
        for i in 0..n {
            let found = find(&t, &key(i)).map(|s| t.as_slice()[s].value());
            assert_eq!(found, (i % 2 == 1).then(|| value(i)), "key {i}");
        }
        assert_eq!(entries(&t).len(), (n / 2) as usize);
        // Deleted slots are reused.
        for i in (0..n).step_by(2) {
            assert!(set(&mut t, &key(i), &value(i + 1000)));
        }
        assert_eq!(entries(&t).len(), n as usize);
    }

    #[test]
    fn room_is_checked_for_all_new_keys_together_without_writing() {
        let mut t = table();
        let first = VipSlot4::first(&key(0));
        let same: Vec<VipKey4> =
            (0..400_000).map(key).filter(|k| VipSlot4::first(k) == first).take(10).collect();
        let n = VIP_PROBES as usize;
        for k in &same[..n - 2] {
            assert!(set(&mut t, k, &value(7)));
        }
        assert_eq!(unplaceable(&t, &same[n - 2..n]), None, "two more fit");
        assert_eq!(unplaceable(&t, &same[n - 2..n + 1]), Some(same[n]), "three do not");
        assert_eq!(unplaceable(&t, &same[..n - 2]), None, "present keys are updates");
        assert_eq!(entries(&t).len(), n - 2, "nothing was written");
    }

    #[test]
    fn a_full_probe_chain_refuses_instead_of_overwriting() {
        let mut t = table();
        // Keys that all start at the same slot.
        let first = VipSlot4::first(&key(0));
        let same: Vec<VipKey4> =
            (0..400_000).map(key).filter(|k| VipSlot4::first(k) == first).take(10).collect();
        assert!(same.len() > VIP_PROBES as usize);
        for k in &same[..VIP_PROBES as usize] {
            assert!(set(&mut t, k, &value(7)));
        }
        assert!(!set(&mut t, &same[VIP_PROBES as usize], &value(8)));
        for k in &same[..VIP_PROBES as usize] {
            assert!(find(&t, k).is_some());
        }
    }
}
