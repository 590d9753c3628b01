//! The one way the CLI prints a table: a header row, columns padded to their widest
//! cell, two spaces between columns, the last column unpadded. Missing values print as
//! `-`. Writing to a closed stdout is not an error (a pager or supervisor stopped reading).

use std::fmt::Display;
use std::io::Write;

/// Rows under a header, printed aligned.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// A cell for an optional value: the value, or `-`.
pub fn opt<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Add a row (missing cells print empty, extra ones are kept).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let lines: Vec<&Vec<String>> = std::iter::once(&self.header).chain(&self.rows).collect();
        let columns = lines.iter().map(|l| l.len()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l.get(i).map_or(0, |c| c.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for l in lines {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = l.get(i).map_or("", String::as_str);
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Print to stdout.
    pub fn print(&self) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(self.render().as_bytes());
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let mut t = Table::new(&["ID", "NAME", "REASON"]);
        t.row(vec!["1".into(), "alexandra".into(), opt(None::<String>)]);
        t.row(vec![
            "12345".into(),
            "bo".into(),
            "too many requests".into(),
        ]);
        assert_eq!(
            t.render(),
            "ID     NAME       REASON\n1      alexandra  -\n12345  bo         too many requests\n"
        );
        assert_eq!(Table::new(&[]).render(), "\n");
        let mut ragged = Table::new(&["A"]);
        ragged.row(vec!["x".into(), "é".into()]);
        assert_eq!(ragged.render(), "A\nx  é\n");
        // Width is counted in characters, not bytes.
        let mut wide = Table::new(&["NAME", "X"]);
        wide.row(vec!["zoë".into(), "1".into()]);
        wide.row(vec!["ab".into(), "2".into()]);
        assert_eq!(wide.render(), "NAME  X\nzoë   1\nab    2\n");
    }
}
