//! A small JSON reader (the tests have no serde) and the shape of `ovlsnap list --json`.

/// A JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number.
    Num(f64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, members in document order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Parses one JSON document (surrounding whitespace allowed).
pub fn parse_json(text: &str) -> Result<Json, String> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing text at byte {}", p.i));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.i))
    }

    fn eat(&mut self, lit: &str) -> bool {
        let ok = self.s[self.i..].starts_with(lit.as_bytes());
        if ok {
            self.i += lit.len();
        }
        ok
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            None => self.err("unexpected end"),
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) if self.eat("true") => Ok(Json::Bool(true)),
            Some(_) if self.eat("false") => Ok(Json::Bool(false)),
            Some(_) if self.eat("null") => Ok(Json::Null),
            Some(_) => self.err("unexpected character"),
        }
    }

    fn object(&mut self) -> Result<Json, String> {
        self.i += 1;
        let mut members = Vec::new();
        self.ws();
        if self.eat("}") {
            return Ok(Json::Obj(members));
        }
        loop {
            self.ws();
            if self.s.get(self.i) != Some(&b'"') {
                return self.err("expected a member name");
            }
            let key = self.string()?;
            self.ws();
            if !self.eat(":") {
                return self.err("expected ':'");
            }
            members.push((key, self.value()?));
            self.ws();
            if self.eat("}") {
                return Ok(Json::Obj(members));
            }
            if !self.eat(",") {
                return self.err("expected ',' or '}'");
            }
        }
    }

    fn array(&mut self) -> Result<Json, String> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.eat("]") {
            return Ok(Json::Arr(items));
        }
        loop {
            items.push(self.value()?);
            self.ws();
            if self.eat("]") {
                return Ok(Json::Arr(items));
            }
            if !self.eat(",") {
                return self.err("expected ',' or ']'");
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else { return self.err("unterminated string") };
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else { return self.err("unterminated escape") };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return self.err("bad escape"),
                    };
                    out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                }
                c if c < 0x20 => return self.err("control character in string"),
                c => out.push(c),
            }
        }
    }

    /// The character of `\uXXXX` (after the `u`), joining a surrogate pair.
    fn unicode_escape(&mut self) -> Result<char, String> {
        let hex4 = |p: &mut Parser| -> Result<u32, String> {
            let h = p.s.get(p.i..p.i + 4).and_then(|h| std::str::from_utf8(h).ok());
            let v = h.and_then(|h| u32::from_str_radix(h, 16).ok()).ok_or(format!("bad \\u escape at {}", p.i))?;
            p.i += 4;
            Ok(v)
        };
        let hi = hex4(self)?;
        let code = if (0xd800..0xdc00).contains(&hi) && self.eat("\\u") {
            let lo = hex4(self)?;
            0x10000 + ((hi - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff)
        } else {
            hi
        };
        char::from_u32(code).ok_or(format!("bad code point {code:x}"))
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        while self.s.get(self.i).is_some_and(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')) {
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).expect("ASCII");
        text.parse().map(Json::Num).map_err(|_| format!("bad number {text:?} at byte {start}"))
    }
}

/// One snapshot as `ovlsnap list --json` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapInfo {
    /// Its name.
    pub name: String,
    /// Its id.
    pub id: f64,
    /// When it was taken (free text).
    pub created: String,
    /// Bytes used by its layer.
    pub layer_bytes: f64,
    /// Entries in its layer.
    pub entries: f64,
}

/// Parses the output of `ovlsnap list --json`: an array of objects with at least a string
/// `name`, a number `id`, a non-empty string `created` and whole non-negative numbers
/// `layer_bytes` and `entries`.
pub fn parse_list(text: &str) -> Result<Vec<SnapInfo>, String> {
    let Json::Arr(items) = parse_json(text)? else { return Err("not a JSON array".into()) };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = |k: &str| item.get(k).ok_or(format!("item {i} has no {k:?}: {item:?}"));
        let string = |k: &str| match field(k)? {
            Json::Str(s) => Ok(s.clone()),
            v => Err(format!("item {i}: {k:?} is not a string: {v:?}")),
        };
        let number = |k: &str| match field(k)? {
            Json::Num(n) => Ok(*n),
            v => Err(format!("item {i}: {k:?} is not a number: {v:?}")),
        };
        let count = |k: &str| {
            let n = number(k)?;
            if n >= 0.0 && n.fract() == 0.0 { Ok(n) } else { Err(format!("item {i}: {k:?} = {n} is not a count")) }
        };
        let info = SnapInfo {
            name: string("name")?,
            id: number("id")?,
            created: string("created")?,
            layer_bytes: count("layer_bytes")?,
            entries: count("entries")?,
        };
        if info.created.trim().is_empty() {
            return Err(format!("item {i}: empty \"created\""));
        }
        out.push(info);
    }
    Ok(out)
}
