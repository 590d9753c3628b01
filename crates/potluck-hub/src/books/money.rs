//! Money inside the hub: [`Micro`], micro-credits with checked arithmetic. Settings are
//! written in credits (`f64`) and converted once, here; the store keeps plain `i64`
//! micro-credits, reached through [`Micro::get`].

/// Micro-credits per credit.
pub(crate) const PER_CREDIT: i64 = 1_000_000;

/// An amount of micro-credits (may be negative: a claw-back, a debt).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Micro(i64);

impl Micro {
    /// Nothing.
    pub(crate) const ZERO: Self = Self(0);
    /// The largest amount (where a price saturates).
    pub(crate) const MAX: Self = Self(i64::MAX);

    /// An amount the store or a price table gave in micro-credits.
    pub(crate) const fn new(micro: i64) -> Self {
        Self(micro)
    }

    /// A setting written in credits, rounded to the micro-credit; out of range it
    /// saturates, and a NaN is zero (settings are checked finite when loaded).
    pub(crate) fn from_credits(credits: f64) -> Self {
        Self((credits * PER_CREDIT as f64).round() as i64)
    }

    /// The amount as the store keeps it.
    pub(crate) const fn get(self) -> i64 {
        self.0
    }

    /// `self + other`, `None` on overflow.
    pub(crate) fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }

    /// The price of `tokens` at `self` per token, `None` on overflow.
    pub(crate) fn checked_times(self, tokens: i64) -> Option<Self> {
        self.0.checked_mul(tokens).map(Self)
    }

    /// Whether it is more than nothing.
    pub(crate) fn is_positive(self) -> bool {
        self.0 > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_rounds_and_arithmetic_is_checked() {
        assert_eq!(Micro::from_credits(1.5).get(), 1_500_000);
        assert_eq!(Micro::from_credits(0.000_000_4).get(), 0);
        assert_eq!(Micro::from_credits(f64::NAN), Micro::ZERO);
        assert_eq!(Micro::from_credits(1e300), Micro::MAX);
        assert_eq!(Micro::new(2).checked_times(3), Some(Micro::new(6)));
        assert_eq!(Micro::MAX.checked_times(2), None);
        assert_eq!(Micro::MAX.checked_add(Micro::new(1)), None);
        assert!(Micro::new(1).is_positive() && !Micro::ZERO.is_positive());
    }
}
