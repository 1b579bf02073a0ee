"""Deterministic test corpus for byte-level BPE tokenizer parity checks (Qwen2 vocabulary).

``build_corpus()`` returns a list of documents (a few hundred bytes to a few KB each) whose
total UTF-8 size is at least ``min_bytes``.  The text comes only from material written in
this file plus the source of a fixed, explicitly named list of standard-library modules
(``STDLIB_MODULES``), and all randomness goes through one ``random.Random(seed)``, so the
same seed gives the same corpus on every machine running the same Python minor version
(the stdlib sources are the only input that can change between Python versions).

Categories (mixed in varying proportions, often inside one document):

* natural text in many scripts (Chinese, English, Japanese, Korean, Arabic, Thai, Russian,
  Hindi, Hebrew, Greek, Vietnamese, German, French, Spanish) and code-switched sentences;
* source code: stdlib Python plus C, JavaScript, Rust, SQL, HTML, JSON, YAML and shell, with
  re-indentation (tabs, 2/4/8 spaces, mixed), trailing spaces and CRLF line endings;
* numbers: long digit runs, separators, scientific notation, hex, dates, phones, IPs;
* emoji: skin tones, ZWJ sequences, flags, tag sequences, keycaps, variation selectors;
* whitespace runs of every kind, including NBSP, U+3000, en/em spaces and zero-width marks;
* unusual Unicode: Zalgo, NFC vs NFD forms, bidi controls, fullwidth, math alphanumerics,
  astral CJK, box drawing, Braille, musical symbols, PUA, noncharacters, controls, ANSI, BOM;
* English contractions with case and apostrophe variants;
* shuffled documents that interleave all of the above at character or word granularity.

Chat control tokens (``<|...|>``, ``<tool_call>`` and friends) never appear: they are
tested separately, and ``_sanitize`` defuses any accidental occurrence.
"""

import functools
import importlib.util
import random
import re
import time
import unicodedata

# ---------------------------------------------------------------------------------------------
# Natural-language source material.  Paragraphs are separated by blank lines.
# ---------------------------------------------------------------------------------------------

ZH_HANS = """\
北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。这座城市有三千多年的建城史，故宫、天坛和颐和园每年吸引着数以百万计的游客。冬天的北京寒冷干燥，春天常有风沙，而秋天被许多人认为是一年中最美的季节。

机器学习模型在训练之前，需要先把文本切分成词元。对于中文来说，一个汉字可能对应一个词元，也可能几个汉字合成一个词元，这取决于分词器的词表是如何训练出来的。如果分词器在不同的实现之间结果不一致，模型的输出就会出现难以察觉的错误。

我昨天在图书馆借了三本书：一本关于宋代历史，一本是鲁迅的小说集，还有一本讲的是量子计算的入门知识。管理员提醒我，借期是三十天，逾期每天要交五毛钱的罚款。

“你吃饭了吗？”这是很多中国人见面时常说的问候语，并不一定真的是在问对方有没有吃饭。类似地，“改天请你喝茶”也往往只是客套话，听的人心里都明白。

长江全长约六千三百公里，是亚洲第一长河。它发源于青藏高原，流经十一个省、自治区和直辖市，最后在上海注入东海。沿岸的城市如重庆、武汉和南京，自古以来就是重要的交通枢纽。"""

ZH_HANT = """\
臺灣位於東亞，四面環海，島上有許多高山，其中玉山海拔將近四千公尺，是東北亞的最高峰。臺北的夜市以小吃聞名，蚵仔煎、滷肉飯和珍珠奶茶都是遊客必嘗的美食。

香港的街道上同時可以看到繁體中文和英文的招牌，電車「叮叮」已經在港島行駛了一百多年。許多老店仍然保留著手寫的價目表，字體端正而優雅。

學習語言最重要的是持之以恆。每天讀一點書、寫幾行字，日積月累，自然就會進步。古人說：「學而時習之，不亦說乎？有朋自遠方來，不亦樂乎？」

這台電腦的記憶體只有八十億位元組，處理大型語言模型時顯得有些吃力。工程師們決定把模型量化成四位元，雖然精度略有下降，但速度快了將近三倍。"""

EN = """\
The tokenizer is the first and last component that touches every piece of text a language model sees. If it splits a word differently from the reference implementation, the model receives a sequence of ids it was never trained on, and the resulting errors are subtle: the output is usually fluent, just slightly wrong.

On a rainy Tuesday in November, the old lighthouse keeper climbed the spiral staircase for what he believed would be the last time. There were one hundred and twelve steps; he had counted them every night for thirty-one years. At the top, he wiped the salt from the glass and waited for the beam to turn.

Byte-level BPE starts from the 256 possible byte values and repeatedly merges the most frequent adjacent pair. Because every string can be written as bytes, there is never an unknown token, but rare scripts and emoji may cost many tokens per character.

Please note: the meeting has been moved from Room 4B to the main auditorium. Coffee, tea, and a selection of pastries will be served at 9:30 a.m.; the keynote starts at 10 o'clock sharp. Questions? Email the organizers (or just ask anyone wearing a green badge).

"Are you sure this is the right road?" she asked, squinting at the map. "Positive," he said, although the sign behind them clearly read CLOSED FOR REPAIRS - DETOUR 12 MILES. They laughed about it for years afterwards."""

EN_CONTRACTIONS = """\
It's not that we don't care; it's that we've been busy. I'm sure you'll understand, and if you'd rather wait, we'll call you when they're ready. She'd said he'd be late, but he's never been late before.

You're right, they've gone, and there's nothing we can do. Who's there? What'll it be? Y'all ain't seen nothin' yet, and I'd've told you if I'd known. It'd be a shame if the '90s came back, though the 1990's weren't all bad.

IT'S LATE. WE'LL LEAVE AT DAWN. THEY'VE ALREADY PACKED, AND I'M READY. DON'T FORGET THE MAP, AND DON'T SAY YOU'D RATHER STAY. SHE'S COMING TOO, ISN'T SHE?

Mixed case happens in real logs: it'S broken, They'VE fixed it, we'LL see, I'M done, you'Re late, HE'd know, it'D work, can'T stop, o'CLOCK, ma'am, rock 'n' roll, 'tis, 'twas, Charles' book and James's car.

Typographic apostrophes look the same to readers but not to tokenizers: it’s, we’ll, they’ve, I’m, don’t, she’d, you’re, O’Brien, ‘quoted’ text, and “double quotes” too."""

JA = """\
東京は日本の首都であり、世界でも有数の大都市です。朝の通勤時間には、電車がほぼ数分おきに到着し、駅のホームは人でいっぱいになります。それでも、多くの人は静かに列に並んで順番を待っています。

今日はとても暑かったので、仕事の帰りにコンビニでアイスクリームを買いました。家に着いたら、冷たい麦茶を飲みながら、ゆっくり本を読むつもりです。明日は久しぶりの休みなので、少し寝坊しても大丈夫でしょう。

機械学習のモデルは、テキストをそのまま理解するわけではありません。まずトークナイザーが文章を小さな単位に分割し、それぞれに番号を割り当てます。ひらがな、カタカナ、漢字が混ざった日本語は、この処理にとって興味深い題材です。

「すみません、駅までの道を教えていただけますか？」と聞くと、おばあさんは親切に地図を描いてくれた。半角カタカナで書くと「ｺﾝﾋﾟｭｰﾀｰ」や「ﾃﾞｰﾀﾍﾞｰｽ」のようになり、見た目も符号も全角とは異なる。"""

KO = """\
서울은 대한민국의 수도이며 한강을 중심으로 남북으로 나뉘어 있습니다. 봄에는 벚꽃이, 가을에는 단풍이 도시를 아름답게 물들입니다. 지하철 노선이 촘촘하게 연결되어 있어서 어디든 쉽게 갈 수 있습니다.

저는 어제 친구와 함께 시장에 가서 떡볶이와 김밥을 먹었어요. 날씨가 추워서 따뜻한 어묵 국물이 정말 맛있었습니다. 다음 주에는 부산에 가서 바다를 보고 싶어요.

한글은 1443년에 세종대왕이 창제했으며, 자음과 모음을 조합하여 음절 단위로 씁니다. 그래서 컴퓨터에서는 완성형과 조합형이라는 두 가지 표현 방식이 존재하고, 유니코드 정규화에 따라 같은 글자가 다른 바이트열이 될 수 있습니다."""

AR = """\
اللغة العربية من أكثر اللغات انتشارًا في العالم، ويتحدث بها أكثر من أربعمائة مليون شخص. تُكتب العربية من اليمين إلى اليسار، وتتصل معظم حروفها ببعضها داخل الكلمة.

ذَهَبَ الوَلَدُ إِلَى المَدْرَسَةِ فِي الصَّبَاحِ البَاكِرِ، وَكَانَ يَحْمِلُ كِتَابًا جَدِيدًا أَهْدَاهُ إِيَّاهُ جَدُّهُ.

يحتاج نموذج اللغة إلى مُجَزِّئ نصوص دقيق، لأن أي اختلاف صغير في تقسيم الكلمات قد يؤدي إلى نتائج غير متوقعة. وفي العربية تظهر الحركات مثل الفَتْحَة والضَّمَّة والكَسْرَة أحيانًا فقط، ولذلك يجب اختبار النصوص المشكولة وغير المشكولة معًا.

قال المعلم: «العِلْمُ نُورٌ، والجَهْلُ ظَلَامٌ»، ثم ابتسم وطلب من الطلاب فتح الصفحة رقم ٤٢ وقراءة الفقرة الأولى بصوت عالٍ."""

TH = """\
ประเทศไทยตั้งอยู่ในภูมิภาคเอเชียตะวันออกเฉียงใต้ มีกรุงเทพมหานครเป็นเมืองหลวง อาหารไทยมีชื่อเสียงไปทั่วโลก เช่น ต้มยำกุ้ง ผัดไทย และส้มตำ

ภาษาไทยไม่ใช้ช่องว่างระหว่างคำ แต่ใช้ช่องว่างเพื่อแบ่งประโยคหรือวลี ทำให้การตัดคำเป็นปัญหาที่น่าสนใจสำหรับคอมพิวเตอร์ และยังมีวรรณยุกต์กับสระที่วางซ้อนอยู่บนหรือใต้พยัญชนะอีกด้วย

เมื่อวานนี้ฝนตกหนักมาก ถนนหลายสายในเมืองมีน้ำท่วมขัง ผู้คนจำนวนมากต้องรอรถเมล์นานกว่าปกติ แต่ทุกคนก็ยังยิ้มและช่วยเหลือกัน"""

RU = """\
Москва — столица России и один из крупнейших городов Европы. Зимой здесь бывает очень холодно, а летом иногда стоит настоящая жара. Метро открылось в 1935 году, и многие станции похожи на подземные дворцы.

Вчера я долго читал «Войну и мир» Льва Толстого и понял, что эту книгу невозможно прочитать за один вечер. В ней более пятисот персонажей и почти полторы тысячи страниц.

Токенизатор разбивает текст на небольшие части, которые модель затем превращает в числа. Если две реализации токенизатора расходятся хотя бы в одном символе, ошибку бывает очень трудно найти.

Съешь же ещё этих мягких французских булок да выпей чаю. ЁЛКА стояла в углу, а ёжик спрятался под диваном; Щука, Юла и Эхо — тоже русские слова."""

HI = """\
भारत दक्षिण एशिया में स्थित एक विशाल देश है। यहाँ सैकड़ों भाषाएँ बोली जाती हैं, और हिंदी उनमें से सबसे अधिक बोली जाने वाली भाषा है।

कल शाम हम लोग बाज़ार गए और वहाँ से ताज़ी सब्ज़ियाँ, फल और मिठाइयाँ खरीदीं। लौटते समय बारिश शुरू हो गई, इसलिए हमने एक छोटी सी दुकान में चाय पी।"""

HE = """\
ירושלים היא אחת הערים העתיקות בעולם, ויש בה אתרים קדושים לשלוש דתות. העברית נכתבת מימין לשמאל, בדרך כלל ללא ניקוד.

בְּרֵאשִׁית בָּרָא אֱלֹהִים אֵת הַשָּׁמַיִם וְאֵת הָאָרֶץ.

אתמול הלכתי לשוק וקניתי תפוזים, לחם טרי וגבינה. המוכר אמר שהמחיר הוא 25 שקלים, אבל בסוף קיבלתי הנחה."""

EL = """\
Η Αθήνα είναι η πρωτεύουσα της Ελλάδας και μία από τις αρχαιότερες πόλεις του κόσμου. Η Ακρόπολη δεσπόζει πάνω από την πόλη εδώ και χιλιάδες χρόνια.

Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Ο ΟΔΥΣΣΕΥΣ ταξίδεψε δέκα χρόνια για να γυρίσει στην Ιθάκη· η ιστορία του είναι γνωστή σε όλους."""

VI = """\
Việt Nam là một quốc gia nằm ở phía đông bán đảo Đông Dương. Thủ đô là Hà Nội, còn thành phố lớn nhất là Thành phố Hồ Chí Minh.

Tiếng Việt dùng chữ Quốc ngữ với rất nhiều dấu thanh: sắc, huyền, hỏi, ngã, nặng. Một chữ cái có thể mang hai dấu cùng lúc, ví dụ như chữ “ệ” trong “Việt” hoặc “ở” trong “ở đâu”.

Hôm qua tôi đã ăn phở bò ở một quán nhỏ gần chợ Bến Thành; nước dùng thơm ngon và giá chỉ có năm mươi nghìn đồng."""

DE = """\
Die Straßenbahn fährt alle zehn Minuten vom Hauptbahnhof über den Marktplatz bis zur Universität. Größere Verspätungen gibt es nur im Winter, wenn Schnee auf den Gleisen liegt.

Donaudampfschifffahrtsgesellschaftskapitän ist ein berühmtes Beispiel für die Fähigkeit des Deutschen, Wörter fast beliebig zusammenzusetzen. Übrigens: „Äpfel“, „Öl“ und „Übung“ beginnen mit Umlauten.

Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. Heißer Kaffee schmeckt mir am besten, wenn draußen der Regen gegen die Fenster prasselt."""

FR = """\
À Paris, les cafés restent ouverts tard le soir, et l'on peut y passer des heures à lire ou à discuter. L'été, les quais de la Seine se transforment en plages éphémères.

Où est la bibliothèque\u00a0? Elle se trouve à côté de l'hôtel de ville, juste après la boulangerie où l'on vend des croissants et des pains au chocolat.

Voix ambiguë d'un cœur qui, au zéphyr, préfère les jattes de kiwis. «\u00a0Bonjour\u00a0!\u00a0» dit-elle, et l'écho répondit\u202f: «\u00a0Ça va\u00a0?\u00a0»"""

ES = """\
El niño pequeño comió una piña entera durante la tarde. ¿Quién habría pensado que podía tener tanta hambre? ¡Qué sorpresa para su abuela!

La economía española creció un 2,5 % el año pasado, según los datos publicados por el Instituto Nacional de Estadística.

El veloz murciélago hindú comía feliz cardillo y kiwi. La cigüeña tocaba el saxofón detrás del palenque de paja."""

CODE_SWITCHED = """\
我今天用Python写了一个BPE tokenizer，速度比HuggingFace的快3倍。

请把config.yaml里的max_tokens改成4096，然后重新运行train.sh脚本。

このAPIはJSONを返しますが、エラーの時はHTTP 500とstack traceが出ます。

이 함수는 UTF-8 바이트를 반환하지만, Windows에서는 CP949로 저장될 수 있습니다.

Привет, world! Как дела с deploy на prod? Сервер nginx снова упал в 3:00 AM.

El modelo GPT分词 de manera distinta cuando el texto tiene emoji 😀 o números como 12345.

Das Meeting ist um 15:00 Uhr, please don't be late — sonst fangen wir ohne dich an.

Le build a échoué parce que `cargo test` a trouvé 2 tests cassés dans src/lexer.rs.

تم تحديث الإصدار v2.3.1 من المكتبة، ويمكنك تثبيته عبر pip install qwenlm."""

LANGUAGES = (
    ("zh-Hans", ZH_HANS),
    ("zh-Hant", ZH_HANT),
    ("en", EN),
    ("en-contractions", EN_CONTRACTIONS),
    ("ja", JA),
    ("ko", KO),
    ("ar", AR),
    ("th", TH),
    ("ru", RU),
    ("hi", HI),
    ("he", HE),
    ("el", EL),
    ("vi", VI),
    ("de", DE),
    ("fr", FR),
    ("es", ES),
    ("mixed", CODE_SWITCHED),
)

# Words with precomposed accents; their NFD forms are generated with ``unicodedata``.
ACCENTED_WORDS = (
    "café",
    "naïve",
    "résumé",
    "Ångström",
    "über",
    "São Paulo",
    "piñata",
    "Zoë",
    "crème brûlée",
    "façade",
    "Việt Nam",
    "Đà Nẵng",
    "tiếng Việt",
    "Ελληνικά",
    "ἀρχή",
    "Йошкар-Ола",
    "한국어",
    "가나다라",
    "がぎぐげご",
    "パピプペポ",
    "Ǆemal",
    "ﬁnancial",
    "Å",
    "ℌ",
)

# ---------------------------------------------------------------------------------------------
# Code snippets (written with 4-space or 2-space indentation; re-indented at random later).
# ---------------------------------------------------------------------------------------------

C_SNIPPET = r"""#include <stdio.h>
#include <stdint.h>
#include <string.h>

/* Compute a 32-bit FNV-1a hash of a NUL-terminated string. */
static uint32_t fnv1a(const char *s) {
    uint32_t h = 0x811C9DC5u;
    while (*s) {
        h ^= (uint8_t)*s++;
        h *= 16777619u;
    }
    return h;
}

typedef struct {
    const char *name;
    double weight;   // kilograms
    int flags[4];
} item_t;

int main(int argc, char **argv) {
    item_t items[] = {{"apple", 0.25, {1, 0, 0, 0}}, {"melon", 1.5e0, {0}}};
    for (int i = 1; i < argc; ++i) {
        printf("%-20s 0x%08X\n", argv[i], fnv1a(argv[i]));
    }
    if (argc > 1 && strcmp(argv[1], "--help") == 0) {
        fputs("usage: hash [WORD...]\n", stderr);
        return 2;
    }
    return (int)(sizeof items / sizeof *items) - 2;
}
"""

JS_SNIPPET = r"""'use strict';
const express = require('express');
const app = express();

/**
 * Returns a greeting; supports names like "Zoë" or "李雷".
 */
function greet(name = 'world') {
  return `Hello, ${name}! Today is ${new Date().toISOString().slice(0, 10)}.`;
}

app.get('/api/v1/users/:id', async (req, res) => {
  const id = Number.parseInt(req.params.id, 10);
  if (Number.isNaN(id) || id <= 0) {
    return res.status(400).json({ error: 'invalid id', id: req.params.id });
  }
  const user = await db.users.findOne({ where: { id } });
  res.json(user ?? { id, name: null, tags: [] });
});

const sum = [1, 2, 3, 4.5, 1e3, 0x1F].reduce((a, b) => a + b, 0);
const re = /^(?:\d{3}-)?\d{4}$/u;
console.log(greet('Zoë'), sum >>> 0, sum === 1040.5 ? "ok" : "bad", re.test('555-1234'));
"""

RUST_SNIPPET = r"""use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Token<'a> {
    pub text: &'a str,
    pub id: u32,
}

/// Count the frequency of each adjacent pair.
fn pair_counts(words: &[Vec<u32>]) -> HashMap<(u32, u32), usize> {
    let mut counts = HashMap::new();
    for w in words {
        for pair in w.windows(2) {
            *counts.entry((pair[0], pair[1])).or_insert(0) += 1;
        }
    }
    counts
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let text = "héllo wörld 你好 🌍";
    let bytes: Vec<u8> = text.bytes().collect();
    println!("{} chars, {} bytes: {:02x?}", text.chars().count(), bytes.len(), &bytes[..8]);
    let big: u128 = 340_282_366_920_938_463_463_374_607_431_768_211_455;
    assert_eq!(big, u128::MAX);
    let _ = pair_counts(&[vec![1, 2, 3], vec![2, 3]]);
    Ok(())
}
"""

SQL_SNIPPET = r"""-- Monthly revenue per region, 2023 only
SELECT r.name AS region,
       DATE_TRUNC('month', o.created_at) AS month,
       COUNT(DISTINCT o.customer_id)     AS customers,
       SUM(o.total_cents) / 100.0        AS revenue
FROM orders o
JOIN regions r ON r.id = o.region_id
WHERE o.created_at >= '2023-01-01' AND o.created_at < '2024-01-01'
  AND o.status NOT IN ('cancelled', 'refunded')
GROUP BY 1, 2
HAVING SUM(o.total_cents) > 1000000
ORDER BY month ASC, revenue DESC;

INSERT INTO customers (id, name, email, city) VALUES
  (1, 'José Álvarez', 'jose@example.com', 'Málaga'),
  (2, '王小明', 'xiaoming@example.cn', '上海'),
  (3, 'O''Brien', 'obrien@example.ie', 'Dún Laoghaire');

CREATE INDEX IF NOT EXISTS idx_orders_created ON orders USING btree (created_at DESC);
UPDATE accounts SET balance = balance - 12.50 WHERE id = 0x2A;  /* not portable */
"""

HTML_SNIPPET = r"""<!DOCTYPE html>
<html lang="zh-CN">
<head>
  <meta charset="utf-8">
  <title>示例页面 &mdash; Example</title>
  <style>
    body { font-family: "Noto Sans", sans-serif; margin: 0 auto; max-width: 72ch; }
    .warn::before { content: "\26A0\FE0F  "; color: #c00; }
  </style>
</head>
<body>
  <h1 class="title" data-id="42">Hello, 世界 &amp; friends!</h1>
  <p>Price: &euro;12,50 &nbsp;|&nbsp; <a href="https://example.com/search?q=caf%C3%A9&amp;lang=fr">café</a></p>
  <!-- TODO: translate the footer -->
  <ul>
    <li><input type="checkbox" checked> Read the docs</li>
    <li><code>&lt;div&gt;</code> is a block element</li>
  </ul>
  <script>document.querySelector('.title').textContent += ' ✓';</script>
</body>
</html>
"""

JSON_SNIPPET = r"""{
  "id": "c0ffee-1234",
  "name": "Zoë Ångström",
  "tags": ["alpha", "β", "γάμμα", "日本語"],
  "price": 1299.99,
  "ratio": 1e-10,
  "nested": {"ok": true, "value": null, "list": [0, -1, 2.5E+3, 18446744073709551615]},
  "escaped": "line1\nline2\ttab \"quoted\" \u00e9 \ud83d\ude00 \\ back",
  "emoji": "🎉",
  "empty": {},
  "matrix": [[1,0,0],[0,1,0],[0,0,1]]
}
"""

YAML_SNIPPET = r"""# Deployment configuration
version: "3.8"
services:
  web:
    image: "nginx:1.25-alpine"
    ports:
      - "80:80"
      - "443:443"
    environment:
      - TZ=Asia/Shanghai
      - GREETING=你好，世界
    command: >
      sh -c 'nginx -g "daemon off;"'
  db:
    image: postgres:16
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U postgres"]
      interval: 10s
      retries: 5
anchors:
  base: &base {cpu: 0.5, memory: 512Mi}
  large:
    <<: *base
    memory: 2Gi
multiline: |
  Line one
    indented line two
  Line three: ümlaut, ñ, ø
"""

SHELL_SNIPPET = r"""#!/usr/bin/env bash
set -euo pipefail
IFS=$'\n\t'

readonly LOG_DIR="${HOME}/logs/$(date +%Y-%m-%d)"
mkdir -p "$LOG_DIR"

for f in ./data/*.csv; do
    [[ -f "$f" ]] || continue
    lines=$(wc -l < "$f")
    if (( lines > 1000 )); then
        echo "large: $f ($lines lines)" | tee -a "$LOG_DIR/summary.txt"
    fi
done

find . -name '*.py' -print0 | xargs -0 grep -n "TODO" 2>/dev/null || true
curl -sSL -H 'Accept: application/json' "https://api.example.com/v2/items?page=${PAGE:-1}&per_page=100" \
    | jq -r '.items[] | "\(.id)\t\(.name)"' > items.tsv
awk -F'\t' '{ sum += $1 } END { printf "%.2f\n", sum / NR }' items.tsv
"""

CODE_SNIPPETS = (
    ("c", C_SNIPPET),
    ("javascript", JS_SNIPPET),
    ("rust", RUST_SNIPPET),
    ("sql", SQL_SNIPPET),
    ("html", HTML_SNIPPET),
    ("json", JSON_SNIPPET),
    ("yaml", YAML_SNIPPET),
    ("bash", SHELL_SNIPPET),
)

# Standard-library modules whose source is used as Python code (fixed, explicit list).
STDLIB_MODULES = (
    "argparse",
    "bisect",
    "calendar",
    "colorsys",
    "csv",
    "difflib",
    "fnmatch",
    "heapq",
    "html.parser",
    "json.decoder",
    "json.encoder",
    "pprint",
    "shlex",
    "string",
    "textwrap",
)

# ---------------------------------------------------------------------------------------------
# Symbol material (invisible characters are always written as escapes).
# ---------------------------------------------------------------------------------------------

NBSP = "\u00a0"
IDEOGRAPHIC_SPACE = "\u3000"
ZWSP, ZWNJ, ZWJ, WORD_JOINER, BOM = "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"
VS15, VS16 = "\ufe0e", "\ufe0f"

# Whitespace-like pieces, from ordinary to exotic (includes characters that are not \s).
WHITESPACE_PIECES = (
    " ",
    "  ",
    "    ",
    "        ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    "\r\n\r\n",
    "\r",
    " \n",
    "\t\n",
    " \t \n",
    "\n ",
    "\n\t",
    "\x0b",
    "\x0c",
    "\x85",
    NBSP,
    NBSP * 3,
    IDEOGRAPHIC_SPACE,
    "\u2002",  # en space
    "\u2003",  # em space
    "\u2007",  # figure space
    "\u2009",  # thin space
    "\u200a",  # hair space
    "\u202f",  # narrow no-break space
    "\u205f",  # medium mathematical space
    "\u1680",  # ogham space mark
    "\u2028",  # line separator
    "\u2029",  # paragraph separator
    ZWSP,
    ZWNJ,
    ZWJ,
    WORD_JOINER,
    "\u180e",  # Mongolian vowel separator (no longer whitespace)
    "\u00ad",  # soft hyphen
)

BIDI_CONTROLS = (
    "\u200e",  # LRM
    "\u200f",  # RLM
    "\u061c",  # ALM
    "\u202a",  # LRE
    "\u202b",  # RLE
    "\u202c",  # PDF
    "\u202d",  # LRO
    "\u202e",  # RLO
    "\u2066",  # LRI
    "\u2067",  # RLI
    "\u2068",  # FSI
    "\u2069",  # PDI
)

EMOJI_BASIC = "😀😂🤣😊😍🤔🙄😴😭😱🤯🥳😎🤖👻💩🙈🔥✨🌈⭐🍕🍣🍜🍺☕🎉🎂🚀✈🚗🏠💡📱💻⌚📚✅❌⚠🆗🆕🔟💯🐍🦀🧠🫠🪐"
EMOJI_TONE_BASES = "👍👋👏🙏💪✌☝👌🤞🤙👶👦👧🧑👨👩👴👵🧒🙋🏃🚴🏊🤷"
SKIN_TONES = tuple(chr(c) for c in range(0x1F3FB, 0x1F400))
PROFESSION_OBJECTS = (
    "💻",
    "🚀",
    "\u2695" + VS16,  # health worker
    "🎓",
    "🍳",
    "🔬",
    "🎨",
    "\u2708" + VS16,  # pilot
    "🚒",
    "\u2696" + VS16,  # judge
    "🌾",
    "🏫",
)
FAMILY_SEQUENCES = (
    ("👨", "👩", "👧", "👦"),
    ("👩", "👩", "👦"),
    ("👨", "👨", "👧", "👧"),
    ("👩", "👧"),
    ("🧑", "🧑", "🧒"),
)
OTHER_ZWJ_SEQUENCES = (
    "🏳" + VS16 + ZWJ + "🌈",
    "🏴" + ZWJ + "\u2620" + VS16,
    "\u2764" + VS16 + ZWJ + "🔥",
    "🐻" + ZWJ + "\u2744" + VS16,
    "👁" + VS16 + ZWJ + "🗨" + VS16,
    "🧑" + ZWJ + "🤝" + ZWJ + "🧑",
    "😶" + ZWJ + "🌫" + VS16,
    "🏃" + ZWJ + "\u2640" + VS16,
    "🤷" + "\U0001f3fd" + ZWJ + "\u2642" + VS16,
    "🐈" + ZWJ + "\u2b1b",
)
FLAG_COUNTRIES = (
    "US", "CN", "JP", "KR", "DE", "FR", "ES", "IT", "GB", "BR", "IN", "RU", "UA", "SA", "AE",
    "IL", "GR", "VN", "TH", "MX", "CA", "AU", "ZA", "NG", "EG", "TR", "SE", "NO", "FI", "PL",
    "NL", "CH", "AR", "CL", "KE",
)  # fmt: skip
TAG_FLAGS = ("gbeng", "gbsct", "gbwls", "usca", "ustx")
VARIATION_SELECTED = (
    "\u2764" + VS16,
    "\u2764" + VS15,
    "\u263a" + VS16,
    "\u2714" + VS16,
    "\u00a9" + VS16,
    "\u00ae",
    "\u2122" + VS16,
    "\u2194" + VS16,
    "\u2600" + VS15,
    "葛\U000e0100",  # ideographic variation sequence (astral selector)
    "辻\U000e0101",
)

FAMOUS_ASTRAL_CJK = ("𠮷野家", "𩸽", "𠀋", "𡈽", "𪚲", "𠜎𠜱𠝹𠱓")

# ---------------------------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------------------------


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


_SENTENCE_END = re.compile(r"(?<=[.!?。！？।])\s*")


def _sentences(text: str) -> list[str]:
    out = []
    for para in _paragraphs(text):
        out.extend(s for s in _SENTENCE_END.split(para) if s)
    return out


_PARAGRAPHS = tuple((code, tuple(_paragraphs(text))) for code, text in LANGUAGES)
_SENTENCES = tuple((code, tuple(_sentences(text))) for code, text in LANGUAGES)
_WORDS = tuple(w for _, text in LANGUAGES for w in text.split())


@functools.cache
def _stdlib_sources() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(module name, lines with their endings) for each module in STDLIB_MODULES."""
    out = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"stdlib module {name!r} has no source file")
        with open(spec.origin, encoding="utf-8", newline="") as f:
            out.append((name, tuple(f.read().splitlines(keepends=True))))
    return tuple(out)


def _target_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.55:
        return rng.randint(300, 1500)
    if r < 0.9:
        return rng.randint(1500, 4000)
    return rng.randint(4000, 8000)


def _fill(rng: random.Random, target: int, make, sep=None) -> str:
    """Concatenate make(rng) pieces (joined by sep(rng) if given) until target bytes."""
    parts: list[str] = []
    size = 0
    while size < target:
        if parts and sep is not None:
            s = sep(rng)
            parts.append(s)
            size += _nbytes(s)
        piece = make(rng)
        parts.append(piece)
        size += _nbytes(piece)
    return "".join(parts)


def _truncate(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _ws(rng: random.Random) -> str:
    return rng.choice(WHITESPACE_PIECES)


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def _random_case(rng: random.Random, word: str) -> str:
    mode = rng.randrange(5)
    if mode == 0:
        return word.lower()
    if mode == 1:
        return word.upper()
    if mode == 2:
        return word.title()
    if mode == 3:
        return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in word)
    return word


# ---------------------------------------------------------------------------------------------
# Natural text.
# ---------------------------------------------------------------------------------------------


def _paragraph_run(rng: random.Random) -> str:
    _, paras = rng.choice(_PARAGRAPHS)
    start = rng.randrange(len(paras))
    count = rng.randint(1, len(paras))
    return "\n\n".join(paras[(start + i) % len(paras)] for i in range(count))


def _code_switched_paragraph(rng: random.Random) -> str:
    langs = rng.sample(_SENTENCES, rng.randint(2, 4))
    sep = rng.choice((" ", "", "\n", " — ", "  "))
    return sep.join(rng.choice(sents) for _, sents in langs for _ in range(rng.randint(1, 2)))


def gen_natural(rng: random.Random, target: int) -> str:
    mode = rng.random()
    if mode < 0.5:
        make = _paragraph_run
    elif mode < 0.8:
        make = _code_switched_paragraph
    else:
        return _fill(rng, target, _paragraph_run, sep=lambda r: r.choice(("\n\n", "\n", " ")))
    return _fill(rng, target, make, sep=lambda r: r.choice(("\n\n", "\n", "\n\n\n", " ")))


# ---------------------------------------------------------------------------------------------
# Source code.
# ---------------------------------------------------------------------------------------------


def _reindent(rng: random.Random, code: str) -> str:
    """Rewrite leading indentation: tabs, 2/4/8 spaces, or a per-line mix."""
    style = rng.choice(("keep", "\t", "  ", "        ", "mixed"))
    if style == "keep":
        return code
    out = []
    for line in code.splitlines(keepends=True):
        stripped = line.lstrip(" ")
        level, rest = divmod(len(line) - len(stripped), 4)
        unit = rng.choice(("\t", "    ", "  ", " \t")) if style == "mixed" else style
        out.append(unit * level + " " * rest + stripped)
    return "".join(out)


def _trailing_spaces(rng: random.Random, code: str) -> str:
    p = rng.choice((0.05, 0.2, 0.5))
    out = []
    for line in code.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        end = line[len(body) :]
        if rng.random() < p:
            body += rng.choice((" ", "  ", "\t", "    ", " \t ", NBSP))
        out.append(body + end)
    return "".join(out)


def _stdlib_window(rng: random.Random, target: int) -> str:
    _, lines = rng.choice(_stdlib_sources())
    start = rng.randrange(max(1, len(lines) - 20))
    out, size = [], 0
    for line in lines[start:]:
        out.append(line)
        size += _nbytes(line)
        if size >= target:
            break
    return "".join(out)


def _snippet(rng: random.Random, target: int) -> str:
    lang, code = rng.choice(CODE_SNIPPETS)
    if target < _nbytes(code) and rng.random() < 0.7:
        lines = code.splitlines(keepends=True)
        start = rng.randrange(len(lines))
        code = "".join(lines[start : start + rng.randint(3, 20)])
    if rng.random() < 0.4:
        code = f"```{lang}\n{code}```\n"
    return code


def _code_piece(rng: random.Random, target: int) -> str:
    if rng.random() < 0.55:
        code = _stdlib_window(rng, target)
        if rng.random() < 0.3:
            code = f"```python\n{code}```\n"
    else:
        code = _snippet(rng, target)
    code = _reindent(rng, code)
    if rng.random() < 0.35:
        code = _trailing_spaces(rng, code)
    return code


def gen_code(rng: random.Random, target: int) -> str:
    def piece(r: random.Random) -> str:
        if r.random() < 0.25:  # prose between code blocks, in any language
            return r.choice(r.choice(_SENTENCES)[1]) + "\n\n"
        return _code_piece(r, min(target, r.randint(200, 2500)))

    text = _fill(rng, target, piece, sep=lambda r: r.choice(("\n", "\n\n", "")))
    if rng.random() < 0.25:
        text = _crlf(text)
    return text


# ---------------------------------------------------------------------------------------------
# Numbers.
# ---------------------------------------------------------------------------------------------

_UNICODE_DIGIT_ZEROS = (0x0660, 0x06F0, 0x0966, 0x09E6, 0x0E50, 0xFF10, 0x1D7CE, 0x1D7F6)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(n))


def _long_digits(rng: random.Random) -> str:
    n = rng.choice((rng.randint(1, 30), rng.randint(30, 120), rng.randint(120, 600)))
    return _digits(rng, n)


def _grouped(rng: random.Random) -> str:
    n = rng.randrange(10 ** rng.randint(4, 16))
    frac = f"{rng.randrange(100):02d}"
    style = rng.randrange(6)
    if style == 0:
        return f"{n:,}.{frac}"
    if style == 1:  # European
        return f"{n:,}".replace(",", ".") + "," + frac
    if style == 2:  # Indian lakh/crore grouping
        s = str(n)
        head, tail = s[:-3], s[-3:]
        groups = []
        while len(head) > 2:
            groups.insert(0, head[-2:])
            head = head[:-2]
        if head:
            groups.insert(0, head)
        return ",".join([*groups, tail]) if groups else tail
    if style == 3:  # space-like separators
        return f"{n:,}".replace(",", rng.choice((" ", NBSP, "\u2009", "\u202f", "'")))
    if style == 4:
        return f"{n:_}"
    return f"-{n}.{frac}"


def _scientific(rng: random.Random) -> str:
    x = rng.uniform(-10, 10) * 10 ** rng.randint(-30, 30)
    return rng.choice(
        (f"{x:.{rng.randint(0, 8)}e}", f"{x:.3E}", repr(x), f"{x:g}", "1e-10", "6.022e23", "-0.0")
    )


def _hexlike(rng: random.Random) -> str:
    v = rng.getrandbits(rng.choice((8, 16, 32, 64)))
    return rng.choice(
        (
            f"0x{v:X}",
            f"0x{v:08x}",
            "0xDEADBEEF",
            "0xCAFEBABE",
            f"#{v & 0xFFFFFF:06x}",
            f"0b{v & 0xFFFF:b}",
            f"0o{v & 0o7777:o}",
            f"\\x{v & 0xFF:02x}",
            f"U+{v & 0x10FFFF:04X}",
        )
    )


def _date(rng: random.Random) -> str:
    y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    hh, mm, ss = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    return rng.choice(
        (
            f"{y}-{m:02d}-{d:02d}",
            f"{d:02d}/{m:02d}/{y}",
            f"{m}/{d}/{y % 100:02d}",
            f"{months[m - 1]} {d}, {y}",
            f"{y}年{m}月{d}日",
            f"{y}년 {m}월 {d}일",
            f"{d}.{m}.{y}",
            f"{y}-{m:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}.{rng.randrange(1000):03d}Z",
            f"{y}-{m:02d}-{d:02d} {hh:02d}:{mm:02d}:{ss:02d}+08:00",
            f"{hh}:{mm:02d} {'AM' if hh < 12 else 'PM'}",
            f"{hh:02d}h{mm:02d}",
        )
    )


def _phone(rng: random.Random) -> str:
    return rng.choice(
        (
            f"+1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{_digits(rng, 4)}",
            f"+86 1{rng.randint(30, 99)} {_digits(rng, 4)} {_digits(rng, 4)}",
            f"+44 20 {_digits(rng, 4)} {_digits(rng, 4)}",
            f"+81-3-{_digits(rng, 4)}-{_digits(rng, 4)}",
            f"010-{_digits(rng, 4)}-{_digits(rng, 4)}",
            f"+49 (0)30 {_digits(rng, 8)}",
            f"tel:+33{_digits(rng, 9)}",
        )
    )


def _network(rng: random.Random) -> str:
    ipv4 = ".".join(str(rng.randrange(256)) for _ in range(4))
    ipv6 = ":".join(f"{rng.getrandbits(16):x}" for _ in range(rng.randint(3, 8)))
    mac = ":".join(f"{rng.getrandbits(8):02X}" for _ in range(6))
    u = f"{rng.getrandbits(128):032x}"
    uuid = f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
    return rng.choice(
        (
            ipv4,
            f"{ipv4}:{rng.randint(1, 65535)}",
            f"{ipv4}/{rng.randint(8, 32)}",
            ipv6,
            f"2001:db8::{rng.getrandbits(16):x}",
            f"[::1]:{rng.randint(1024, 65535)}",
            mac,
            uuid,
            f"v{rng.randint(0, 20)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}-rc.{rng.randint(1, 9)}",
        )
    )


def _money(rng: random.Random) -> str:
    n = rng.randint(0, 10**7)
    return rng.choice(
        (
            f"${n:,}.{rng.randrange(100):02d}",
            f"€ {n // 100},{n % 100:02d}",
            f"¥{n}",
            f"₹{n:,}",
            f"{n} ₽",
            f"£{n / 100:.2f}",
            f"{rng.randint(0, 100)}%",
            f"{rng.uniform(0, 100):.1f} %",
            f"{n}원",
            f"{n}円",
        )
    )


def _unicode_digits(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        zero = rng.choice(_UNICODE_DIGIT_ZEROS)
        return "".join(chr(zero + rng.randrange(10)) for _ in range(rng.randint(1, 12)))
    if kind == 1:
        return "".join(chr(0x2460 + rng.randrange(20)) for _ in range(rng.randint(1, 5)))
    if kind == 2:
        return rng.choice(("x²", "10⁻³", "H₂O", "½", "¼ + ¾", "⅓", "Ⅻ", "ⅷ", "Ⅳ世纪", "m³", "2⁶⁴"))
    if kind == 3:
        return "".join(
            rng.choice("〇一二三四五六七八九十百千万亿") for _ in range(rng.randint(2, 8))
        )
    return rng.choice(("壹佰贰拾叁元整", "第3,4章", "三千五百万", "٣٫١٤", "١٬٢٣٤٬٥٦٧"))


_NUMBER_MAKERS = (
    _long_digits,
    _grouped,
    _scientific,
    _hexlike,
    _date,
    _phone,
    _network,
    _money,
    _unicode_digits,
)

_NUMBER_TEMPLATES = (
    "The total was {}.",
    "Total: {}",
    "合计：{}",
    "合計は{}です。",
    "총 {} 입니다.",
    "المجموع: {}",
    "Итого: {}",
    "x = {}",
    "[{}]",
    "({})",
    "id={}&n={}",
    "{}\t{}\t{}",
    "{},{},{}",
    "{}",
    "{}{}",
    "{} ",
    "Call {} before {}.",
    "Σ = {} ± {}",
    "π ≈ 3.14159265358979323846264338327950288419716939937510",
)


def _number_line(rng: random.Random) -> str:
    tmpl = rng.choice(_NUMBER_TEMPLATES)
    vals = [rng.choice(_NUMBER_MAKERS)(rng) for _ in range(tmpl.count("{}"))]
    return tmpl.format(*vals)


def gen_numbers(rng: random.Random, target: int) -> str:
    return _fill(rng, target, _number_line, sep=lambda r: r.choice(("\n", " ", "; ", "\n\n", "")))


# ---------------------------------------------------------------------------------------------
# Emoji.
# ---------------------------------------------------------------------------------------------


def _flag(code: str) -> str:
    return "".join(chr(0x1F1E6 + ord(c) - ord("A")) for c in code)


def _emoji(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice(EMOJI_BASIC)
    if kind == 1:
        return rng.choice(EMOJI_TONE_BASES) + rng.choice(SKIN_TONES)
    if kind == 2:
        return ZWJ.join(rng.choice(FAMILY_SEQUENCES))
    if kind == 3:
        person = rng.choice("🧑👨👩")
        if rng.random() < 0.5:
            person += rng.choice(SKIN_TONES)
        return person + ZWJ + rng.choice(PROFESSION_OBJECTS)
    if kind == 4:
        return rng.choice(OTHER_ZWJ_SEQUENCES)
    if kind == 5:
        r = rng.random()
        if r < 0.8:
            return _flag(rng.choice(FLAG_COUNTRIES))
        if r < 0.9:  # invalid pair or a lone regional indicator
            return _flag("ZZ") if rng.random() < 0.5 else _flag("Q")
        tag = rng.choice(TAG_FLAGS)
        return "🏴" + "".join(chr(0xE0000 + ord(c)) for c in tag) + "\U000e007f"
    if kind == 6:
        return rng.choice("#*0123456789") + rng.choice((VS16 + "\u20e3", "\u20e3"))
    if kind == 7:
        return rng.choice(VARIATION_SELECTED)
    return "".join(rng.choice(EMOJI_BASIC) for _ in range(rng.randint(2, 8)))


def _emoji_line(rng: random.Random) -> str:
    words = rng.choice(_SENTENCES)[1]
    sentence = rng.choice(words).split(" ")
    out = []
    for w in sentence:
        out.append(w)
        if rng.random() < 0.35:
            glue = rng.choice(("", " ", "  ", "\n"))
            out.append(glue + "".join(_emoji(rng) for _ in range(rng.randint(1, 3))))
    return " ".join(out)


def gen_emoji(rng: random.Random, target: int) -> str:
    return _fill(rng, target, _emoji_line, sep=lambda r: r.choice(("\n", " ", "", "\n\n")))


# ---------------------------------------------------------------------------------------------
# Whitespace.
# ---------------------------------------------------------------------------------------------


def _whitespace_run(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return " " * rng.randint(2, 80)
    if r < 0.45:
        return "\t" * rng.randint(1, 12)
    if r < 0.6:
        return "\n" * rng.randint(2, 10)
    if r < 0.7:
        return "\r\n" * rng.randint(1, 6)
    return "".join(_ws(rng) for _ in range(rng.randint(1, 8)))


def _whitespace_line(rng: random.Random) -> str:
    words = rng.choice(_SENTENCES)[1]
    tokens = rng.choice(words).split(" ")
    out = [rng.choice(("", " ", "\t", "  ", IDEOGRAPHIC_SPACE))]
    for w in tokens:
        out.append(w)
        out.append(_whitespace_run(rng) if rng.random() < 0.3 else _ws(rng))
    return "".join(out)


def gen_whitespace(rng: random.Random, target: int) -> str:
    return _fill(rng, target, _whitespace_line, sep=_whitespace_run)


# ---------------------------------------------------------------------------------------------
# Unusual Unicode.
# ---------------------------------------------------------------------------------------------


def _zalgo(rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    return "".join(
        c + "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(rng.randint(0, 8))) for c in word
    )


def _nfc_nfd(rng: random.Random) -> str:
    word = rng.choice(ACCENTED_WORDS)
    nfc, nfd = unicodedata.normalize("NFC", word), unicodedata.normalize("NFD", word)
    nfkd = unicodedata.normalize("NFKD", word)
    return rng.choice(
        (
            f"{nfc} / {nfd}",
            f"{nfd} {nfd}",
            f"NFD: {nfd}",
            f"{nfc}{nfd}",
            f"NFKD({nfc}) = {nfkd}",
            "e\u0301 vs \u00e9; A\u030a vs \u00c5 vs \u212b",
        )
    )


def _bidi(rng: random.Random) -> str:
    c = rng.choice
    return (
        f"{c(BIDI_CONTROLS)}abc {c(BIDI_CONTROLS)}שלום{c(BIDI_CONTROLS)} "
        f"مرحبا {c(BIDI_CONTROLS)}123{c(BIDI_CONTROLS)} world{c(BIDI_CONTROLS)}"
    )


def _fullwidth(rng: random.Random) -> str:
    text = rng.choice(("Hello, World!", "ABC-123 xyz", "FULLWIDTH (test) #1", "a+b=c?"))
    return "".join(chr(ord(ch) - 0x21 + 0xFF01) if "!" <= ch <= "~" else "\u3000" for ch in text)


def _math_alnum(rng: random.Random) -> str:
    # (capital A, small a, digit 0) for bold, sans-serif, sans-serif bold and monospace.
    upper, lower, digit = rng.choice(
        (
            (0x1D400, 0x1D41A, 0x1D7CE),
            (0x1D5A0, 0x1D5BA, 0x1D7E2),
            (0x1D5D4, 0x1D5EE, 0x1D7EC),
            (0x1D670, 0x1D68A, 0x1D7F6),
        )
    )
    text = rng.choice(("Theorem 1", "Let x be 42", "ABC def 789", "Qwen2 Tokenizer"))
    out = []
    for ch in text:
        if "A" <= ch <= "Z":
            out.append(chr(upper + ord(ch) - 65))
        elif "a" <= ch <= "z":
            out.append(chr(lower + ord(ch) - 97))
        elif "0" <= ch <= "9":
            out.append(chr(digit + ord(ch) - 48))
        else:
            out.append(ch)
    return "".join(out)


def _astral_cjk(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return rng.choice(FAMOUS_ASTRAL_CJK)
    return "".join(chr(rng.randint(0x20000, 0x2A6D6)) for _ in range(rng.randint(1, 10)))


def _box_drawing(rng: random.Random) -> str:
    w = rng.randint(3, 12)
    return (
        "┌" + "─" * w + "┬" + "─" * w + "┐\n"
        "│" + " " * w + "│" + "░▒▓█"[rng.randrange(4)] * w + "│\n"
        "╞" + "═" * w + "╪" + "═" * w + "╡\n"
        "└" + "─" * w + "┴" + "─" * w + "┘"
    )


def _codepoint_run(rng: random.Random, lo: int, hi: int, n: int) -> str:
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


def _symbols(rng: random.Random) -> str:
    kind = rng.randrange(6)
    n = rng.randint(1, 16)
    if kind == 0:
        return _codepoint_run(rng, 0x2800, 0x28FF, n)  # Braille
    if kind == 1:
        return _codepoint_run(rng, 0x1D100, 0x1D126, n)  # musical symbols
    if kind == 2:
        return _codepoint_run(rng, 0xE000, 0xF8FF, n)  # BMP private use
    if kind == 3:
        return _codepoint_run(rng, 0xF0000, 0xF00FF, n)  # plane-15 private use
    if kind == 4:
        return "".join(
            rng.choice(
                ("\ufffd", "\ufffe", "\uffff", "\ufdd0", "\ufdef", "\U0001fffe", "\U0010ffff")
            )
            for _ in range(n)
        )
    return "".join(rng.choice("∀∂∃∅∇∈∉∑∏√∞≈≠≤≥⊂⊃⊕⊗→⇒⇔↑↓←©®™§¶†‡•…‰′″‹›«»") for _ in range(n))


def _controls(rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    color = rng.choice(("31", "1;32", "0;33", "38;5;208", "4", "7"))
    return rng.choice(
        (
            f"\x1b[{color}m{word}\x1b[0m",
            f"{word}\x00{word}",
            f"\x07bell{word}\x08\x08",
            "".join(chr(rng.randrange(0x20)) for _ in range(rng.randint(1, 6))),
            f"\x7f{word}\x9b\x80\x9f",
            f"\x1b]0;title\x07{word}",
            f"{BOM}{word}",
            f"{word}{BOM}{word}",
        )
    )


def _format_chars(rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    mid = len(word) // 2
    ch = rng.choice(
        (ZWSP, ZWNJ, ZWJ, WORD_JOINER, "\u00ad", "\ufff9", "\ufffc", "\u3164", "\u115f", "\u034f")
    )
    return word[:mid] + ch + word[mid:]


def _random_codepoints(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(1, 12)):
        cp = rng.choice(
            (rng.randint(0x80, 0x3000), rng.randint(0x3000, 0xFFFF), rng.randint(0x10000, 0x10FFFF))
        )
        if 0xD800 <= cp <= 0xDFFF:  # never a lone surrogate
            cp -= 0x800
        out.append(chr(cp))
    return "".join(out)


_UNICODE_MAKERS = (
    _zalgo,
    _nfc_nfd,
    _nfc_nfd,
    _bidi,
    _fullwidth,
    _math_alnum,
    _astral_cjk,
    _box_drawing,
    _symbols,
    _controls,
    _format_chars,
    _random_codepoints,
)


def _unicode_piece(rng: random.Random) -> str:
    return rng.choice(_UNICODE_MAKERS)(rng)


def gen_unicode(rng: random.Random, target: int) -> str:
    def piece(r: random.Random) -> str:
        if r.random() < 0.3:
            return r.choice(r.choice(_SENTENCES)[1])
        return _unicode_piece(r)

    return _fill(rng, target, piece, sep=lambda r: r.choice((" ", "\n", "", "  ", "\t")))


# ---------------------------------------------------------------------------------------------
# English contractions.
# ---------------------------------------------------------------------------------------------

_CONTRACTION = re.compile(r"(?i)(\w)(['’])(s|t|re|ve|m|ll|d)\b")
_APOSTROPHES = ("'", "'", "'", "’", "ʼ", "＇", "`", "´", "‘")


def _contraction_sentence(rng: random.Random) -> str:
    _, sents = rng.choice(_SENTENCES[2:4])
    text = rng.choice(sents)

    def swap(m: re.Match) -> str:
        apos = rng.choice(_APOSTROPHES)
        return m.group(1) + apos + _random_case(rng, m.group(3))

    text = _CONTRACTION.sub(swap, text)
    if rng.random() < 0.2:
        text = text.upper()
    return text


def gen_contractions(rng: random.Random, target: int) -> str:
    return _fill(rng, target, _contraction_sentence, sep=lambda r: r.choice((" ", "\n", "  ")))


# ---------------------------------------------------------------------------------------------
# Mixed and shuffled documents.
# ---------------------------------------------------------------------------------------------

_BASE_GENERATORS = (
    gen_natural,
    gen_code,
    gen_numbers,
    gen_emoji,
    gen_whitespace,
    gen_unicode,
    gen_contractions,
)


def _fragment(rng: random.Random, lo: int = 60, hi: int = 700) -> str:
    gen = rng.choice(_BASE_GENERATORS)
    return _truncate(gen(rng, rng.randint(lo, hi)), hi * 2)


def gen_mixed(rng: random.Random, target: int) -> str:
    return _fill(rng, target, _fragment, sep=lambda r: r.choice(("", " ", "\n", "\n\n", _ws(r))))


_WORD_SPLIT = re.compile(r"(\s+)")


def _units(rng: random.Random, text: str, granularity: str) -> list[str]:
    if granularity == "char":
        return list(text)
    if granularity == "word":
        return [u for u in _WORD_SPLIT.split(text) if u]
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 8)
        out.append(text[i : i + n])
        i += n
    return out


def gen_shuffle(rng: random.Random, target: int) -> str:
    """Interleave fragments of every category at char / word / chunk granularity."""
    granularity = rng.choice(("char", "word", "chunk"))
    streams = []
    size = 0
    while size < target:
        frag = _fragment(rng, 80, 500)
        size += _nbytes(frag)
        streams.append(_units(rng, frag, granularity))
    if rng.random() < 0.3:  # full shuffle
        units = [u for s in streams for u in s]
        rng.shuffle(units)
        return "".join(units)
    # Riffle merge: keeps each stream's order, alternates between streams at random.
    pos = [0] * len(streams)
    live = list(range(len(streams)))
    out = []
    while live:
        k = rng.randrange(len(live))
        i = live[k]
        take = rng.randint(1, 4)
        out.extend(streams[i][pos[i] : pos[i] + take])
        pos[i] += take
        if pos[i] >= len(streams[i]):
            live.pop(k)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Corpus assembly.
# ---------------------------------------------------------------------------------------------

GENERATORS = (
    (gen_natural, 20),
    (gen_code, 20),
    (gen_numbers, 8),
    (gen_emoji, 7),
    (gen_whitespace, 8),
    (gen_unicode, 10),
    (gen_contractions, 5),
    (gen_mixed, 12),
    (gen_shuffle, 10),
)

MIN_DOC_BYTES = 200
MAX_DOC_BYTES = 10_000

# Chat control tokens and other added tokens must never appear in the corpus.
_FORBIDDEN = re.compile(r"<\|[^<>|]*\|>|</?(?:tool_call|tool_response|think)>")


def _sanitize(text: str) -> str:
    return _FORBIDDEN.sub(lambda m: "< " + m.group(0)[1:], text)


def _decorate(rng: random.Random, doc: str) -> str:
    """Leading/trailing whitespace, BOMs and line-ending variants at document level."""
    if rng.random() < 0.12:
        doc = rng.choice((_whitespace_run(rng), _ws(rng), BOM, "\n", "   ", "\t")) + doc
    if rng.random() < 0.18:
        doc += rng.choice((_whitespace_run(rng), _ws(rng), "\n", " ", "\t\n", "\r\n"))
    r = rng.random()
    if r < 0.06:
        doc = _crlf(doc)
    elif r < 0.08:
        doc = doc.replace("\r\n", "\n").replace("\n", "\r")
    return doc


def build_corpus(min_bytes: int = 1_100_000, seed: int = 0) -> list[str]:
    """Documents whose total UTF-8 size is >= min_bytes; identical for the same seed."""
    rng = random.Random(seed)
    gens = [g for g, _ in GENERATORS]
    weights = [w for _, w in GENERATORS]
    docs: list[str] = []
    total = 0
    i = 0
    while total < min_bytes:
        # One document of every category first, then a weighted random mix.
        gen = gens[i] if i < len(gens) else rng.choices(gens, weights)[0]
        i += 1
        doc = gen(rng, _target_size(rng))
        while _nbytes(doc) < MIN_DOC_BYTES:
            doc += _ws(rng) + _fragment(rng)
        doc = _sanitize(_decorate(rng, _truncate(doc, MAX_DOC_BYTES)))
        docs.append(doc)
        total += _nbytes(doc)
    return docs


if __name__ == "__main__":
    t0 = time.perf_counter()
    corpus = build_corpus()
    elapsed = time.perf_counter() - t0
    total_bytes = sum(_nbytes(d) for d in corpus)
    print(f"{len(corpus)} documents, {total_bytes} bytes, built in {elapsed:.2f}s")
