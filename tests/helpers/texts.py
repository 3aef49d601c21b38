"""Raw texts the clean stage's tests write (tests/unit/pipelines/clean/): a scene of Hamlet in modern and in First
Folio spelling, Milton, a sonnet, Project Gutenberg's and the World Library's boilerplate around them, an HTML
page and a line that cp1252 can encode."""

MODERN = """Ber. Who's there?
Fran. Nay, answer me: stand, and unfold yourself.
Ber. Long live the king!
Fran. Bernardo?
Ber. He.
Fran. You come most carefully upon your hour.
Ber. 'Tis now struck twelve. Get thee to bed, Francisco.
Fran. For this relief much thanks: 'tis bitter cold,
And I am sick at heart.
Ber. Have you had quiet guard?
Fran. Not a mouse stirring.
Ber. Well, good night.
If you do meet Horatio and Marcellus,
The rivals of my watch, bid them make haste.
Mar. Horatio says 'tis but our fantasy,
And will not let belief take hold of him
Touching this dreaded sight, twice seen of us:
Therefore I have entreated him along
With us to watch the minutes of this night;
That, if again this apparition come,
He may approve our eyes and speak to it.
Hor. Tush, tush, 'twill not appear.
"""


FOLIO = """Barnardo. Who's there?
Fran. Nay answer me: Stand & vnfold your selfe
Bar. Long liue the King
Fran. Barnardo?
Bar. He
Fran. You come most carefully vpon your houre
Bar. 'Tis now strook twelue, get thee to bed Francisco
Fran. For this releefe much thankes: 'Tis bitter cold,
And I am sicke at heart
Barn. Haue you had quiet Guard?
Fran. Not a Mouse stirring
Barn. Well, goodnight. If you do meet Horatio and
Marcellus, the Riuals of my Watch, bid them make hast.
Mar. Horatio saies, 'tis but our Fantasie,
And will not let beleefe take hold of him
Touching this dreaded sight, twice seene of vs,
Therefore I haue intreated him along
With vs, to watch the minutes of this Night,
That if againe this Apparition come,
He may approue our eyes, and speake to it
Hor. Tush, tush, 'twill not appeare
"""


MILTON = """Of Man's first disobedience, and the fruit
Of that forbidden tree whose mortal taste
Brought death into the World, and all our woe,
With loss of Eden, till one greater Man
Restore us, and regain the blissful seat,
Sing, Heavenly Muse, that, on the secret top
Of Oreb, or of Sinai, didst inspire
That shepherd who first taught the chosen seed
In the beginning how the heavens and earth
Rose out of Chaos: or, if Sion hill
Delight thee more, and Siloa's brook that flowed
Fast by the oracle of God, I thence
Invoke thy aid to my adventurous song,
That with no middle flight intends to soar
Above th' Aonian mount, while it pursues
Things unattempted yet in prose or rhyme.
"""


SONNET = """Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove:
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
"""


BODY = "HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\n\n" + MODERN


GUTENBERG_MODERN = f"""\ufeffThe Project Gutenberg EBook of Hamlet, by William Shakespeare\r
\r
This eBook is for the use of anyone anywhere at no cost and with\r
almost no restrictions whatsoever.  You may copy it, give it away or\r
re-use it under the terms of the Project Gutenberg License included\r
with this eBook or online at www.gutenberg.org\r
\r
\r
Title: Hamlet\r
\r
Author: William Shakespeare\r
\r
Release Date: November 1998 [EBook #1524]\r
Last Updated: December 30, 2017\r
\r
Language: English\r
\r
Character set encoding: UTF-8\r
\r
*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
\r
\r
\r
Produced by Dianne Bean and David Widger\r
\r
\r
\r
\r
{BODY.replace(chr(10), chr(13) + chr(10))}\r
\r
\r
\r
End of the Project Gutenberg EBook of Hamlet, by William Shakespeare\r
\r
*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
***** This file should be named 1524-0.txt or 1524-0.zip *****\r
This and all associated files of various formats will be found in:\r
        http://www.gutenberg.org/1/5/2/1524/\r
\r
*** START: FULL LICENSE ***\r
\r
THE FULL PROJECT GUTENBERG LICENSE\r
PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK\r
\r
Section 1.  General Terms of Use and Redistributing Project Gutenberg-tm\r
electronic works\r
"""


WORLD_LIBRARY = """<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS
PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE
WITH PERMISSION.  ELECTRONIC AND MACHINE READABLE COPIES MAY BE
DISTRIBUTED SO LONG AS SUCH COPIES (1) ARE FOR YOUR OR OTHERS
PERSONAL USE ONLY, AND (2) ARE NOT DISTRIBUTED OR USED
COMMERCIALLY.  PROHIBITED COMMERCIAL DISTRIBUTION INCLUDES BY ANY
SERVICE THAT CHARGES FOR DOWNLOAD TIME OR FOR MEMBERSHIP.>>
"""


GUTENBERG_OLD = f"""**The Project Gutenberg Etext of Hamlet, by Shakespeare**
#4 in our series by William Shakespeare

Copyright laws are changing all over the world, be sure to check
the copyright laws for your country before posting these files!!

**Welcome To The World of Free Plain Vanilla Electronic Texts**

**Etexts Readable By Both Humans and By Computers, Since 1971**

*These Etexts Prepared By Hundreds of Volunteers and Donations*

***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***
Why is this "Small Print!" statement here?  You know: lawyers.
They tell us you might sue us if there is something wrong with
your copy of this etext, even if you got it for free from
someone other than us, and even if what's wrong is not our
fault.

*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

{WORLD_LIBRARY}
{BODY}
{WORLD_LIBRARY}
End of Project Gutenberg Etext of Hamlet by Shakespeare
PG has multiple editions of William Shakespeare's Complete Works
"""


PAGE = """<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE html><html><head><title>Sonnet 18</title><style>p { color: red }</style>
<script>var x = "<p>not text</p>";</script></head>
<body><!-- a comment -->
<h1>Sonnet   18</h1>
<p>Shall I compare thee to a summer&#8217;s day?<br>
Thou art more lovely and more temperate:</p>
<p>Rough winds do shake the <i>darling</i> buds of May,<br/>And summer&rsquo;s lease hath all too short a date;</p>
<ul><li>one</li><li>two &amp; three</li></ul>
<pre>  keep   this
    spacing</pre>
</body></html>"""


CAFE = "The café — a naïve “résumé” of façades, déjà vu; ‘Grüße’ aus Köln.\n"
