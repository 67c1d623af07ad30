//! The relay's Elligator2 decode: representative to Montgomery `u`, with one field
//! exponentiation.
//!
//! A setup's `E_i` is the Elligator2 representative of the client's ephemeral key;
//! every relay maps it back to the key's Montgomery `u` before its X25519. The map
//! (RFC 9380 §6.7.1 with `Z = 2`, as `curve25519-elligator2`'s `map_to_point`) is
//!
//! ```text
//! w = 1 + 2 r^2                    (RFC 9380: w = 1 if 2 r^2 = -1, which no r meets)
//! d = -A / w
//! u = d         if d^3 + A d^2 + d is a square (or zero)
//! u = -d - A    otherwise
//! ```
//!
//! `curve25519-elligator2` spends four exponentiations on it (an inversion, a square
//! test, the point's `y`, which `u` does not need, and a second inversion); its field
//! type is private, so this module has its own (radix 2^51, as `curve25519-dalek`'s
//! serial backend) and needs one. With `g = d^3 + A d^2 + d = N / w^3`, where
//! `N = A (A^2 (w - 1) - w^2)`, `g` is a square iff `t = N w` is (they differ by the
//! square `w^4`). Let `v = w^2 t` and `e = v^((p-3)/2)`. Then `e v = v^((p-1)/2)` is
//! Legendre's symbol `chi(t)` (±1) and `e w t = chi(t) / w`, so `1 / w = chi(t) e w t`:
//! the square test and the inversion come from the same `e`. (`v = 0` would need
//! `t = 0`, which no `w` meets, as the tests show; the branch for it stays, with a
//! separate inversion.)
//!
//! The representative is public (it travels in the clear) and so is its `u`, so the
//! code may branch on the values; no secret passes through it. Tests compare it with
//! `curve25519-elligator2`'s map on random representatives.

const MASK: u64 = (1 << 51) - 1;

/// An element of GF(2^255 - 19): five limbs of 51 bits (each kept below 2^52).
#[derive(Clone, Copy, Debug)]
struct Fe([u64; 5]);

/// Curve25519's `A`.
const A: Fe = Fe([486_662, 0, 0, 0, 0]);
const ONE: Fe = Fe([1, 0, 0, 0, 0]);
const ZERO: Fe = Fe([0; 5]);

fn load8(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// Carries each limb's bits above 51 into the next one, without folding the top.
fn carry(l: &mut [u64; 5]) {
    for i in 0..4 {
        l[i + 1] += l[i] >> 51;
        l[i] &= MASK;
    }
}

impl Fe {
    /// The low 255 bits of `b`, little endian (bit 255 is ignored).
    fn from_bytes(b: &[u8; 32]) -> Fe {
        Fe([
            load8(&b[0..]) & MASK,
            (load8(&b[6..]) >> 3) & MASK,
            (load8(&b[12..]) >> 6) & MASK,
            (load8(&b[19..]) >> 1) & MASK,
            (load8(&b[24..]) >> 12) & MASK,
        ])
    }

    /// Limbs below 2^52 again (2^255 = 19).
    fn reduce(mut l: [u64; 5]) -> Fe {
        carry(&mut l);
        let top = l[4] >> 51;
        l[4] &= MASK;
        l[0] += 19 * top;
        Fe(l)
    }

    /// The canonical encoding (the value reduced below p).
    fn to_bytes(self) -> [u8; 32] {
        let mut l = Self::reduce(self.0).0;
        // Fold whatever is above bit 255 twice: the value is then below 2^255.
        for _ in 0..2 {
            carry(&mut l);
            let top = l[4] >> 51;
            l[4] &= MASK;
            l[0] += 19 * top;
        }
        carry(&mut l);
        // v >= p iff v + 19 >= 2^255.
        let mut t = l;
        t[0] += 19;
        carry(&mut t);
        if t[4] >> 51 != 0 {
            t[4] &= MASK;
            l = t;
        }
        let mut out = [0u8; 32];
        out[0..8].copy_from_slice(&(l[0] | (l[1] << 51)).to_le_bytes());
        out[8..16].copy_from_slice(&((l[1] >> 13) | (l[2] << 38)).to_le_bytes());
        out[16..24].copy_from_slice(&((l[2] >> 26) | (l[3] << 25)).to_le_bytes());
        out[24..32].copy_from_slice(&((l[3] >> 39) | (l[4] << 12)).to_le_bytes());
        out
    }

    fn eq(self, other: Fe) -> bool {
        self.to_bytes() == other.to_bytes()
    }

    fn is_zero(self) -> bool {
        self.to_bytes() == [0; 32]
    }

    fn add(self, b: Fe) -> Fe {
        let a = self.0;
        let b = b.0;
        Self::reduce([
            a[0] + b[0],
            a[1] + b[1],
            a[2] + b[2],
            a[3] + b[3],
            a[4] + b[4],
        ])
    }

    /// `self - b`, computed as `self + 4p - b` (limbs below 2^52 stay non-negative).
    fn sub(self, b: Fe) -> Fe {
        const P4_0: u64 = 4 * ((1 << 51) - 19);
        const P4_I: u64 = 4 * ((1 << 51) - 1);
        let a = self.0;
        let b = b.0;
        Self::reduce([
            a[0] + P4_0 - b[0],
            a[1] + P4_I - b[1],
            a[2] + P4_I - b[2],
            a[3] + P4_I - b[3],
            a[4] + P4_I - b[4],
        ])
    }

    fn neg(self) -> Fe {
        ZERO.sub(self)
    }

    /// Folds the five 128-bit column sums of a product into limbs below 2^52.
    /// Column sums stay below 2^112 for inputs below 2^52, and the last carry below
    /// 2^56, so `19 * carry` fits in a u64.
    fn fold(c: [u128; 5]) -> Fe {
        let mut c = c;
        let mut r = [0u64; 5];
        for i in 0..4 {
            c[i + 1] += c[i] >> 51;
            r[i] = (c[i] as u64) & MASK;
        }
        r[4] = (c[4] as u64) & MASK;
        r[0] += 19 * (c[4] >> 51) as u64;
        r[1] += r[0] >> 51;
        r[0] &= MASK;
        Fe(r)
    }

    fn mul(self, b: Fe) -> Fe {
        let [a0, a1, a2, a3, a4] = self.0;
        let [b0, b1, b2, b3, b4] = b.0;
        let m = |x: u64, y: u64| u128::from(x) * u128::from(y);
        let (b1_19, b2_19, b3_19, b4_19) = (19 * b1, 19 * b2, 19 * b3, 19 * b4);
        Self::fold([
            m(a0, b0) + m(a1, b4_19) + m(a2, b3_19) + m(a3, b2_19) + m(a4, b1_19),
            m(a0, b1) + m(a1, b0) + m(a2, b4_19) + m(a3, b3_19) + m(a4, b2_19),
            m(a0, b2) + m(a1, b1) + m(a2, b0) + m(a3, b4_19) + m(a4, b3_19),
            m(a0, b3) + m(a1, b2) + m(a2, b1) + m(a3, b0) + m(a4, b4_19),
            m(a0, b4) + m(a1, b3) + m(a2, b2) + m(a3, b1) + m(a4, b0),
        ])
    }

    fn square(self) -> Fe {
        let [a0, a1, a2, a3, a4] = self.0;
        let m = |x: u64, y: u64| u128::from(x) * u128::from(y);
        let (d0, d1, d2, d3) = (2 * a0, 2 * a1, 2 * a2, 2 * a3);
        let (a3_19, a4_19) = (19 * a3, 19 * a4);
        Self::fold([
            m(a0, a0) + m(d1, a4_19) + m(d2, a3_19),
            m(d0, a1) + m(d2, a4_19) + m(a3, a3_19),
            m(d0, a2) + m(a1, a1) + m(d3, a4_19),
            m(d0, a3) + m(d1, a2) + m(a4, a4_19),
            m(d0, a4) + m(d1, a3) + m(a2, a2),
        ])
    }

    /// `self^(2^k)`.
    fn pow2k(self, k: u32) -> Fe {
        let mut x = self;
        for _ in 0..k {
            x = x.square();
        }
        x
    }

    /// `(self^(2^250 - 1), self^11)`: the common part of the exponentiations below
    /// (the addition chain of ref10).
    fn pow22501(self) -> (Fe, Fe) {
        let z2 = self.square();
        let z9 = z2.pow2k(2).mul(self);
        let z11 = z9.mul(z2);
        let z_5_0 = z11.square().mul(z9); // 2^5 - 1
        let z_10_0 = z_5_0.pow2k(5).mul(z_5_0);
        let z_20_0 = z_10_0.pow2k(10).mul(z_10_0);
        let z_40_0 = z_20_0.pow2k(20).mul(z_20_0);
        let z_50_0 = z_40_0.pow2k(10).mul(z_10_0);
        let z_100_0 = z_50_0.pow2k(50).mul(z_50_0);
        let z_200_0 = z_100_0.pow2k(100).mul(z_100_0);
        let z_250_0 = z_200_0.pow2k(50).mul(z_50_0);
        (z_250_0, z11)
    }

    /// `self^(p-2) = 1/self` (0 for 0).
    fn invert(self) -> Fe {
        let (z_250_0, z11) = self.pow22501();
        z_250_0.pow2k(5).mul(z11)
    }

    /// `self^((p-3)/2) = self^(2^254 - 11)`.
    fn pow_p_minus_3_half(self) -> Fe {
        let (z_250_0, _) = self.pow22501();
        let z5 = self.pow2k(2).mul(self);
        z_250_0.pow2k(4).mul(z5)
    }
}

/// `w = 1 + 2 r^2` of a representative (its two top bits ignored) and `t = N w`, whose
/// Legendre symbol picks the map's branch (see the module docs).
fn w_and_t(representative: &[u8; 32]) -> (Fe, Fe) {
    let mut b = *representative;
    b[31] &= 0x3f;
    let r = Fe::from_bytes(&b);
    let r2 = r.square();
    let mut tv1 = r2.add(r2);
    if tv1.eq(ONE.neg()) {
        tv1 = ZERO;
    }
    let w = ONE.add(tv1);
    let a2 = A.square();
    let n = A.mul(a2.mul(w.sub(ONE)).sub(w.square()));
    (w, n.mul(w))
}

/// Whether `t` is a square (or zero) and `1 / x`, from one exponentiation: with
/// `v = x^2 t` and `e = v^((p-3)/2)`, `e v = chi(t)` and `1 / x = chi(t) e t x` (see
/// the module docs). `None` when `v = 0`.
fn square_test_and_inverse(t: Fe, x: Fe) -> Option<(bool, Fe)> {
    let v = x.square().mul(t);
    if v.is_zero() {
        return None;
    }
    let e = v.pow_p_minus_3_half();
    let square = e.mul(v).eq(ONE);
    let inv = e.mul(t).mul(x);
    Some((square, if square { inv } else { inv.neg() }))
}

/// The Montgomery `u` (canonical little-endian bytes) of an Elligator2 representative,
/// the same as `curve25519_elligator2::MontgomeryPoint::map_to_point` (its two top
/// bits are ignored).
pub fn representative_to_u(representative: &[u8; 32]) -> [u8; 32] {
    let (w, t) = w_and_t(representative);
    let Some((square, inv_w)) = square_test_and_inverse(t, w) else {
        // g(d) = 0: d is the u of a point of order 2; d is the answer.
        return A.neg().mul(w.invert()).to_bytes();
    };
    let d = A.neg().mul(inv_w);
    let u = if square { d } else { d.add(A).neg() };
    u.to_bytes()
}

/// The Edwards `y` (canonical bytes, sign bit 0) of the point whose Montgomery `u` is
/// [`representative_to_u`], computed with the same single exponentiation: what
/// `curve25519_dalek`'s `MontgomeryPoint::to_edwards` would compute from that `u`
/// with one more (`y = (u - 1) / (u + 1)`). `None` where that map has no answer or the
/// trick below does not apply (`u = -1`, or `v = 0`); the caller then goes through `u`.
///
/// With `u = d = -A / w` (square branch), `y = (A + w) / D1`, `D1 = A - w`; with
/// `u = -d - A = A (1 - w) / w`, `y = (A - A w - w) / D2`, `D2 = A - A w + w`. One
/// inversion of `Y = D1 D2` serves both (`1 / D1 = D2 / Y`), and the exponentiation of
/// [`representative_to_u`] yields it with `v = t Y^2` in place of `t w^2`: `e v` is
/// `chi(t)` and `1 / Y = chi(t) e t Y` (`square_test_and_inverse`).
pub fn representative_to_edwards_y(representative: &[u8; 32]) -> Option<[u8; 32]> {
    let (w, t) = w_and_t(representative);
    let a_minus_aw = A.sub(A.mul(w));
    let d1 = A.sub(w);
    let d2 = a_minus_aw.add(w);
    let (square, inv) = square_test_and_inverse(t, d1.mul(d2))?;
    let y = if square {
        A.add(w).mul(d2).mul(inv)
    } else {
        a_minus_aw.sub(w).mul(d1).mul(inv)
    };
    Some(y.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_elligator2::{MontgomeryPoint, Randomized};
    use rand_core::{OsRng, RngCore};

    fn fe(n: u64) -> Fe {
        Fe::reduce([n, 0, 0, 0, 0])
    }

    /// p - 1 + k, as bytes (k <= 20).
    fn p_plus(k: u8) -> [u8; 32] {
        // p = 2^255 - 19: 0xed, 0xff * 30, 0x7f.
        let mut b = [0xffu8; 32];
        b[0] = 0xec + k;
        b[31] = 0x7f;
        b
    }

    #[test]
    fn encoding_is_canonical() {
        assert_eq!(
            Fe::from_bytes(&p_plus(0)).to_bytes()[0],
            0xec,
            "p - 1 stays"
        );
        assert_eq!(Fe::from_bytes(&p_plus(1)).to_bytes(), [0; 32], "p is 0");
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(Fe::from_bytes(&p_plus(2)).to_bytes(), one, "p + 1 is 1");
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        b[31] &= 0x3f;
        assert_eq!(Fe::from_bytes(&b).to_bytes(), b, "below p: unchanged");
        assert!(ONE.neg().add(ONE).is_zero());
    }

    #[test]
    fn field_arithmetic_is_consistent() {
        for _ in 0..200 {
            let mut b = [0u8; 32];
            OsRng.fill_bytes(&mut b);
            let x = Fe::from_bytes(&b);
            let y = Fe::from_bytes(&{
                let mut c = [0u8; 32];
                OsRng.fill_bytes(&mut c);
                c
            });
            assert!(x.mul(x.invert()).eq(ONE), "x / x = 1");
            assert!(x.square().eq(x.mul(x)));
            assert!(x.add(y).sub(y).eq(x));
            assert!(x.mul(y).eq(y.mul(x)));
            assert!(x.mul(y.add(ONE)).eq(x.mul(y).add(x)));
            // A square's Legendre symbol is 1: (x^2)^((p-1)/2) = 1.
            let s = x.square();
            assert!(s.pow_p_minus_3_half().mul(s).eq(ONE));
        }
        // 2 is not a square mod p (p = 5 mod 8): its symbol is -1; -1 is one (p = 1
        // mod 4).
        assert!(fe(2).pow_p_minus_3_half().mul(fe(2)).eq(ONE.neg()));
        let m1 = ONE.neg();
        assert!(m1.pow_p_minus_3_half().mul(m1).eq(ONE));
        assert!(fe(2).invert().mul(fe(2)).eq(ONE));
    }

    #[test]
    fn the_map_matches_curve25519_elligator2() {
        for _ in 0..5000 {
            let mut r = [0u8; 32];
            OsRng.fill_bytes(&mut r);
            assert_eq!(
                representative_to_u(&r),
                MontgomeryPoint::map_to_point(&r).to_bytes(),
                "representative {r:02x?}"
            );
        }
        for r in [[0u8; 32], [0xff; 32], p_plus(0), p_plus(1), {
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        }] {
            assert_eq!(
                representative_to_u(&r),
                MontgomeryPoint::map_to_point(&r).to_bytes(),
                "representative {r:02x?}"
            );
        }
    }

    /// A square root of `x`, if it has one (p = 5 mod 8: `x^((p+3)/8)`, times
    /// `sqrt(-1)` if needed).
    fn sqrt(x: Fe) -> Option<Fe> {
        let (z_250_0, _) = x.pow22501();
        let cand = z_250_0.pow2k(2).mul(x.square()); // x^(2^252 - 2)
        if cand.square().eq(x) {
            return Some(cand);
        }
        let (t, _) = fe(2).pow22501();
        let sqrt_m1 = t.pow2k(3).mul(fe(8)); // 2^((p-1)/4) = 2^(2^253 - 5)
        let cand = cand.mul(sqrt_m1);
        cand.square().eq(x).then_some(cand)
    }

    #[test]
    fn the_exceptional_inputs_match_too() {
        // 2 r^2 = -1 has no solution (-1/2 is not a square: -1 is one and 2 is not),
        // so the map's special case for it (w = 1) never applies.
        let half = fe(2).invert();
        assert!(sqrt(ONE.neg().mul(half)).is_none());
        assert!(sqrt(ONE.neg()).is_some() && sqrt(fe(4)).is_some());
        // t = 0 (g(d) = 0) needs w^2 - A^2 w + A^2 = 0, whose discriminant
        // A^4 - 4 A^2 = A^2 (A - 2)(A + 2) is not a square (A^2 - 4 is not: the
        // curve's 2-torsion u's, roots of u^2 + A u + 1, are not in the field), so no
        // w, and no representative, reaches the `v = 0` branch; it stays for safety.
        let a2 = A.square();
        assert!(sqrt(a2.square().sub(a2.mul(fe(4)))).is_none());
    }

    /// The `y` computed straight from the representative is the one
    /// curve25519-dalek's `to_edwards` computes from its `u`, for random
    /// representatives, clients' ones and the special inputs.
    #[test]
    fn the_edwards_y_is_that_of_the_u() {
        use curve25519_dalek::montgomery::MontgomeryPoint as Dalek;
        let check = |r: &[u8; 32]| {
            let u = Dalek(representative_to_u(r));
            match (representative_to_edwards_y(r), u.to_edwards(0)) {
                (Some(y), Some(p)) => assert_eq!(y, p.compress().to_bytes(), "{r:02x?}"),
                (None, _) => {}
                (Some(y), None) => panic!("y {y:02x?} for a u without a point: {r:02x?}"),
            }
        };
        let mut none = 0;
        for _ in 0..5000 {
            let mut r = [0u8; 32];
            OsRng.fill_bytes(&mut r);
            check(&r);
            none += usize::from(representative_to_edwards_y(&r).is_none());
        }
        assert_eq!(none, 0, "random representatives all take the direct way");
        for _ in 0..200 {
            check(&crate::setup::Ephemeral::generate(&mut OsRng).representative);
        }
        for r in [[0u8; 32], [0xff; 32], p_plus(0), p_plus(1), p_plus(2)] {
            check(&r);
        }
        // Y = 0 needs w = A (D1 = 0: u = -1, which has no Edwards point) or
        // w = A / (A - 1) (D2 = 0), so 2 r^2 = w - 1; neither (w - 1) / 2 is a square,
        // so no representative gets None (the fallback through u stays for safety),
        // and t = 0 is unreachable too (`the_exceptional_inputs_match_too`).
        for w in [A, A.mul(A.sub(ONE).invert())] {
            assert!(sqrt(w.sub(ONE).mul(fe(2).invert())).is_none());
        }
    }

    #[test]
    fn a_clients_ephemeral_key_comes_back() {
        for _ in 0..200 {
            let e = crate::setup::Ephemeral::generate(&mut OsRng);
            let want = MontgomeryPoint::from_representative::<Randomized>(&e.representative)
                .expect("a client's representative maps back");
            assert_eq!(representative_to_u(&e.representative), want.to_bytes());
        }
    }
}
